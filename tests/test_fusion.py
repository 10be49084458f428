"""FFN Fusion: the fused FFN is the sum of the run's FFNs on the run's input, saved as a loadable child."""

import json

import pytest
import torch

from puzzle.blocks.fusion import Dependency, attention_free_runs, ffn_dependencies, fuse_mlp, fusion_groups
from puzzle.blocks.modeling_puzzle import MLP, DeciLMConfig, DeciLMForCausalLM, RMSNorm
from puzzle.api import distill_stage
from puzzle.checkpoint import load_child
from puzzle.stages.fuse import fuse_child
from tests.helpers import FAST, cli, copy_run, with_random_norms, with_solution, write_job

ATOL = 1e-5  # float32; the fused FFN sums the same products in another order
FUSE = FAST + ["eval.speed_repeats=1", "eval.speed_warmup=0", "eval.validation_blocks=2"]
ATTENTION, NO_ATTENTION = {"n_heads_in_group": 2}, {"no_op": True}


def child_with_run(attention: list[dict], sizes: list[int]) -> DeciLMForCausalLM:
    blocks = [{"attention": a, "ffn": {"intermediate_size": s}} for a, s in zip(attention, sizes)]
    config = DeciLMConfig(vocab_size=64, hidden_size=16, num_hidden_layers=len(blocks), num_attention_heads=4,
                          intermediate_size=32, block_configs=blocks, max_position_embeddings=64,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    return with_random_norms(DeciLMForCausalLM(config))


FIVE = [ATTENTION, NO_ATTENTION, NO_ATTENTION, NO_ATTENTION, ATTENTION]  # one attention-free run: layers 1-3


def test_a_fused_pair_of_ffns_is_their_sum_on_the_same_input():
    norms = [RMSNorm(16, 1e-5), RMSNorm(16, 1e-5)]
    mlps = [MLP(16, 24, 1e-5, norm=False), MLP(16, 40, 1e-5, norm=False)]
    for n in norms:
        torch.nn.init.uniform_(n.weight, 0.5, 1.5)
    x = torch.randn(3, 7, 16) * 4
    norm, fused = fuse_mlp(norms=norms, mlps=mlps)
    with torch.no_grad():
        torch.testing.assert_close(fused(norm(x)), mlps[0](norms[0](x)) + mlps[1](norms[1](x)), atol=ATOL, rtol=0)
    assert fused.gate_proj.out_features == 64 and torch.equal(norm.weight, torch.ones(16))


def test_fused_run_follows_the_formula_and_leaves_the_last_ffn_alone():
    child = child_with_run(FIVE, [32, 24, 40, 32, 32])
    runs = attention_free_runs(child)
    assert runs == [range(1, 4)]
    groups = fusion_groups(runs, [], include_last=False)
    assert groups == [range(1, 3)]
    fused = fuse_child(child, groups=groups)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        before = child(ids, use_cache=False, output_hidden_states=True).hidden_states
        after = fused(ids, use_cache=False, output_hidden_states=True).hidden_states
        h = before[1]
        layers = child.model.layers
        expected = h + sum(layers[k].mlp(layers[k].post_attention_layernorm(h)) for k in (1, 2))
        torch.testing.assert_close(after[3], expected, atol=ATOL, rtol=0)
    f = fused.config.block_configs
    assert f[1]["ffn"]["intermediate_size"] == 64 and f[2]["ffn"]["no_op"] and fused.model.layers[2].mlp is None
    # The run's last FFN is the unfused child's, weight for weight.
    assert f[3] == child.config.block_configs[3]
    for (name, a), b in zip(fused.model.layers[3].state_dict().items(), child.model.layers[3].state_dict().values()):
        assert torch.equal(a, b), name


def test_include_last_fuses_the_whole_run_and_max_distance_cuts_it():
    run = [range(0, 4)]
    deps = [Dependency(0, 1, 0.1), Dependency(1, 2, 0.5), Dependency(2, 3, 0.1)]
    assert fusion_groups(run, deps, include_last=True) == [range(0, 4)]
    assert fusion_groups(run, deps, include_last=True, max_distance=0.3) == [range(0, 2), range(2, 4)]
    assert fusion_groups(run, deps, include_last=False, max_distance=0.3) == [range(0, 2)]
    assert fusion_groups([range(2, 4)], deps, include_last=False) == []


def test_dependency_is_zero_after_an_ffn_that_adds_nothing():
    child = child_with_run(FIVE, [32, 24, 40, 32, 32])
    with torch.no_grad():
        child.model.layers[1].mlp.down_proj.weight.zero_()
    deps = ffn_dependencies(child, runs=[range(1, 4)], blocks=torch.randint(0, 64, (3, 10)), batch_size=2)
    assert [(d.first, d.second) for d in deps] == [(1, 2), (2, 3)]
    assert deps[0].distance == pytest.approx(0.0, abs=1e-6)
    assert 1e-4 < deps[1].distance < 2


@pytest.fixture(scope="module")
def job(tmp_path_factory, fast_library):
    path, config = copy_run(fast_library, tmp_path_factory.mktemp("fusion"), FUSE)
    distill_stage(config)  # the session's library, checked and reused
    return path, config


def fuse_cli(monkeypatch, capsys, path, *args):
    return cli(monkeypatch, capsys, "fuse", path, *[a for f in FUSE for a in ("--set", f)], *args)


def test_fuse_command_saves_a_child_that_loads_and_follows_the_formula(job, monkeypatch, capsys):
    path, config = job
    source = with_solution(config, ["attention.noop+ffn.i96", "attention.noop+ffn.i48"]).directory
    code, out = fuse_cli(monkeypatch, capsys, path, "--include-last")
    assert code == 0, out.err
    assert "fused layers: 0-1" in out.out and "0 → 1" in out.out and "KL to unfused" in out.out
    target = source.with_name("checkpoint-fused")
    report = json.loads((target.parent / "fusion.json").read_text())
    assert report["fused"] == [[0, 1]] and len(report["dependencies"]) == 1
    assert report["after"]["kl_to_unfused"] < 1e-6 and report["before"]["prefill_tokens_per_second"] > 0
    info = json.loads((target / "puzzle_child.json").read_text())
    assert [x["ffn"] for x in info["layers"]] == ["ffn.i144", "ffn.noop"] and info["fusion"]["groups"] == [[0, 1]]
    assert info["fusion"]["after"] == report["after"]

    from transformers import AutoModelForCausalLM

    unfused, fused = load_child(source), load_child(target)
    remote = AutoModelForCausalLM.from_pretrained(target, trust_remote_code=True).eval()
    ids = torch.randint(3, fused.config.vocab_size, (2, 10))
    with torch.no_grad():
        h = unfused.model.embed_tokens(ids)
        layers = unfused.model.layers
        expected = h + sum(layers[k].mlp(layers[k].post_attention_layernorm(h)) for k in (0, 1))
        expected = unfused.lm_head(unfused.model.norm(expected))
        torch.testing.assert_close(fused(ids).logits, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(remote(input_ids=ids).logits, expected, atol=ATOL, rtol=0)
    generated = remote.generate(ids[:, :4], max_new_tokens=6, do_sample=False)
    assert generated.shape == (2, 10)


def test_a_run_too_short_after_leaving_out_its_last_ffn_is_left_alone(job, monkeypatch, capsys):
    path, config = job
    source = with_solution(config, ["attention.noop+ffn.i48", "attention.noop+ffn.i96"]).directory
    target = source.with_name("short-fused")
    code, out = fuse_cli(monkeypatch, capsys, path, "--output", target)
    assert code == 0, out.err
    assert "nothing to fuse" in out.out and "--include-last" in out.out and "0 → 1" in out.out
    assert not target.exists()


def test_a_child_without_an_attention_free_run_is_said_so(job, monkeypatch, capsys):
    path, config = job
    source = with_solution(config, ["attention.kv1+ffn.i96", "attention.noop+ffn.i48"]).directory
    code, out = fuse_cli(monkeypatch, capsys, path, "--include-last", "--output", source.with_name("none-fused"))
    assert code == 0, out.err
    assert "nothing to fuse" in out.out and "has no run of 2 or more" in out.out
    assert not source.with_name("none-fused").exists()


@pytest.mark.parametrize(
    "args, message",
    [(["--child", "/nonexistent/child"], "--child: /nonexistent/child is not a child checkpoint"),
     (["--max-distance", "0"], "--max-distance: got 0.0; expected a positive cosine distance")],
)
def test_fuse_bad_input_exits_2(job, monkeypatch, capsys, args, message):
    path, _ = job
    code, out = fuse_cli(monkeypatch, capsys, path, *args)
    assert code == 2 and message in out.err and len(out.err.strip().splitlines()) == 1


def test_fuse_before_realize_names_the_missing_child(tmp_path, tiny_parent_dir, monkeypatch, capsys):
    code, out = fuse_cli(monkeypatch, capsys, write_job(tmp_path, tiny_parent_dir))
    assert code == 2 and "no child to fuse" in out.err and "run `puzzle realize` first" in out.err
    assert len(out.err.strip().splitlines()) == 1


def test_fuse_takes_a_child_directory_and_reads_its_runs_config(job, monkeypatch, capsys, tmp_path):
    from puzzle.rundir import RunDir

    _, config = job
    source = with_solution(config, ["attention.noop+ffn.i96", "attention.noop+ffn.i48"]).directory
    RunDir.of(config).write_config(config)  # as every command does
    target = source.with_name("by-directory-fused")
    code, out = cli(monkeypatch, capsys, "fuse", str(source), "--include-last", "--output", str(target))
    assert code == 0, out.err
    assert "fused layers: 0-1" in out.out and (target / "config.json").is_file()
    code, out = cli(monkeypatch, capsys, "fuse", str(tmp_path))
    assert code == 2 and "not a child checkpoint inside a run directory" in out.err
    assert len(out.err.strip().splitlines()) == 1
