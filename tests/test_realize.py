"""`puzzle realize`: the child checkpoint loads in a fresh process, matches in memory, generates with and without cache."""

import json
import os
import subprocess
import sys

import pytest
import torch

from puzzle.blocks.modeling_puzzle import DeciLMConfig
from puzzle.distill.library import Library
from puzzle.cli import main
from puzzle.engines import servability
from puzzle.parents import load_parent
from puzzle.blocks.specs import BlockChoice
from puzzle.checkpoint import build_child
from puzzle.api import search_stage
from tests.helpers import scored_job, with_solution
from tests.tiny import VARIANTS, tiny_model

ATOL = 1e-5  # float32; the child runs the same math as the parent, partly in another order


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_parent_dir, fast_scored):
    return scored_job(tmp_path_factory.mktemp("realize"), tiny_parent_dir, start_from=fast_scored)[1]


def test_child_with_every_layer_kept_equals_the_parent(job):
    summary = with_solution(job, ["attention.kv2+ffn.i96", "attention.kv2+ffn.i96"])
    parent = load_parent(job.parent)
    from transformers import AutoModelForCausalLM

    child = AutoModelForCausalLM.from_pretrained(summary.directory, trust_remote_code=True).eval()
    ids = torch.randint(0, parent.model.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(child(input_ids=ids).logits, parent.model(input_ids=ids).logits, atol=ATOL, rtol=0)
    assert summary.parameters == summary.parent_parameters


MIXED = [
    ["attention.kv2.window8+ffn.linear", "attention.linear+ffn.i48"],
    ["attention.noop+ffn.i96", "attention.kv1+ffn.noop"],
]


@pytest.mark.slow
@pytest.mark.parametrize("blocks", MIXED, ids=["window-linear", "noop-kv1"])
def test_fresh_process_loads_the_child_with_the_same_logits(job, blocks, tmp_path):
    summary = with_solution(job, blocks)
    parent = load_parent(job.parent)
    in_memory = build_child(parent, Library(job.run.dir / "library", parent.adapter), [BlockChoice.from_id(b) for b in blocks])
    ids = torch.randint(0, parent.model.config.vocab_size, (1, 20))
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import sys, torch, transformers
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(summary.directory)!r}, trust_remote_code=True).eval()
ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, {str(tmp_path / 'logits.pt')!r})
assert not any(m.split('.')[0] in ('puzzle', 'blocks', 'distill', 'search') for m in sys.modules), 'puzzle was imported'
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = in_memory(input_ids=ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("blocks", MIXED, ids=["window-linear", "noop-kv1"])
def test_generate_with_and_without_cache_gives_the_same_tokens(job, blocks):
    summary = with_solution(job, blocks)
    from transformers import AutoModelForCausalLM

    child = AutoModelForCausalLM.from_pretrained(summary.directory, trust_remote_code=True).eval()
    prompt = torch.randint(3, child.config.vocab_size, (2, 6))
    cached = child.generate(prompt, max_new_tokens=14, do_sample=False, use_cache=True)
    uncached = child.generate(prompt, max_new_tokens=14, do_sample=False, use_cache=False)
    assert cached.shape[1] > 6 and torch.equal(cached, uncached)


def test_block_configs_and_per_layer_config_round_trip_and_engine_formula(job):
    summary = with_solution(job, ["attention.kv1+ffn.i48", "attention.linear+ffn.noop"])
    written = json.loads((summary.directory / "config.json").read_text())
    assert written["model_type"] == "nemotron-nas" and written["architectures"] == ["DeciLMForCausalLM"]
    assert written["auto_map"]["AutoModelForCausalLM"] == "modeling_puzzle.DeciLMForCausalLM"
    loaded = DeciLMConfig.from_pretrained(summary.directory)
    assert loaded.block_configs == written["block_configs"]
    a0, f0 = written["block_configs"][0]["attention"], written["block_configs"][0]["ffn"]
    assert a0["n_heads_in_group"] == 6 and a0["num_key_value_heads"] == 1
    # 48 is off the 256 grid: no multiplier is written, so vLLM reads intermediate_size itself.
    assert f0["intermediate_size"] == 48 and "ffn_mult" not in f0
    a1, f1 = written["block_configs"][1]["attention"], written["block_configs"][1]["ffn"]
    assert a1 == {"no_op": False, "replace_with_linear": True, "n_heads_in_group": None, "window_length": None}
    assert f1["no_op"] and f1["ffn_mult"] is None
    # The same layers in transformers 5.x's per_layer_config; a linear attention has no word there.
    assert written["per_layer_config"] == {"0": {"num_key_value_heads": 1, "intermediate_size": 48},
                                           "1": {"skip": ["mlp"]}}
    assert loaded.per_layer_config[0].num_key_value_heads == 1 and loaded.per_layer_config[0].intermediate_size == 48
    assert loaded.per_layer_config[1].skip == ["mlp"] and loaded.per_layer_config[0].skip == []
    assert (summary.directory / "modeling_puzzle.py").is_file() and (summary.directory / "tokenizer.json").is_file()


def test_block_configs_read_by_attribute_as_vllm_reads_them_and_save_as_plain_json(tmp_path):
    blocks = [{"attention": {"no_op": False, "n_heads_in_group": 2}, "ffn": {"no_op": False, "ffn_mult": 1.5}},
              {"attention": {"no_op": True}, "ffn": {"no_op": False, "intermediate_size": 96}}]
    config = DeciLMConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, block_configs=blocks)
    first, second = config.block_configs
    assert first.attention.n_heads_in_group == 2 and first["attention"]["n_heads_in_group"] == 2
    assert hasattr(first.ffn, "ffn_mult") and not hasattr(second.ffn, "ffn_mult")  # vLLM: ffn_mult, else the width
    assert second.ffn.intermediate_size == 96 and second.attention.no_op and not hasattr(second.ffn, "hidden_act")
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["block_configs"] == blocks
    assert DeciLMConfig.from_pretrained(tmp_path).block_configs[1].ffn.intermediate_size == 96


def test_engine_verdicts():
    def config(blocks):
        return DeciLMConfig(hidden_size=1536, num_attention_heads=12, num_hidden_layers=len(blocks), block_configs=blocks,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e4})

    dense = {"attention": {"n_heads_in_group": 4}, "ffn": {"ffn_mult": 1.5, "intermediate_size": 1536}}
    on_grid = servability(config([dense]))
    assert all(v.servable for v in on_grid)
    # Engines' formula gives the size back on the grid: round_up(int(2·1.5·1536/3), 256) = 1536.
    size = int(2 * 1.5 * 1536 / 3)
    assert size + (-size) % 256 == 1536
    removed_ffn = {"attention": {"n_heads_in_group": 4}, "ffn": {"no_op": True, "ffn_mult": None}}
    verdicts = {v.engine: v for v in servability(config([removed_ffn]))}
    assert verdicts["vLLM"].servable and not verdicts["llama.cpp"].servable
    assert "skips the whole layer" in verdicts["llama.cpp"].reasons[0]
    # vLLM adds the first layer's FFN to a residual its removed attention never made (run: ValueError).
    first_removed = {"attention": {"no_op": True}, "ffn": dense["ffn"]}
    verdicts = {v.engine: v for v in servability(config([first_removed, dense]))}
    assert not verdicts["vLLM"].servable and "first layer's attention removed" in verdicts["vLLM"].reasons[0]
    assert {v.engine: v for v in servability(config([dense, first_removed]))}["vLLM"].servable
    linear = {"attention": {"replace_with_linear": True, "n_heads_in_group": None}, "ffn": dense["ffn"]}
    verdicts = {v.engine: v for v in servability(config([dense, linear]))}
    assert not verdicts["vLLM"].servable and verdicts["llama.cpp"].servable
    off_grid = {"attention": {"n_heads_in_group": 4}, "ffn": {"intermediate_size": 1000}}  # as realize writes it
    verdicts = {v.engine: v for v in servability(config([off_grid]))}
    assert verdicts["vLLM"].servable and not verdicts["llama.cpp"].servable


def test_llama_cpp_verdicts_name_what_its_converter_and_runtime_did():
    """The classes llama.cpp's own converter and runtime refused or got wrong (issue 18), each named."""
    from puzzle.engines import Engine, child_reasons

    def reasons(blocks, **model):
        fields = {"hidden_size": 1536, "num_attention_heads": 12, **model}
        return child_reasons(Engine.llama_cpp, DeciLMConfig(num_hidden_layers=len(blocks), block_configs=blocks,
                                                            rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                                                            **fields))

    dense = {"attention": {"n_heads_in_group": 4}, "ffn": {"ffn_mult": 1.5, "intermediate_size": 1536}}
    removed = {"attention": {"no_op": True}, "ffn": dense["ffn"]}
    linear = {"attention": {"replace_with_linear": True}, "ffn": dense["ffn"]}
    gone = {"attention": {"no_op": True}, "ffn": {"no_op": True}}
    assert reasons([dense, removed, linear]) == []
    [first] = reasons([removed, dense])
    assert "first layer" in first
    assert any("last layer removed whole" in r for r in reasons([dense, gone]))
    assert any("no layer keeps softmax" in r for r in reasons([linear, linear]))
    assert any("invalid n_rot" in r for r in reasons([dense], head_dim=64))  # 12 × 64 ≠ 1536
    assert any("k_norm" in r for r in reasons([dense], qk_norm=True))
    with_window = {"attention": {"n_heads_in_group": 4, "window_length": 64}, "ffn": dense["ffn"]}
    assert any("wrong from the window's length on" in r for r in reasons([dense, with_window]))
    rope = child_reasons(Engine.llama_cpp, DeciLMConfig(hidden_size=1536, num_attention_heads=12, num_hidden_layers=1,
                                                         block_configs=[dense], rope_parameters={
                                                             "rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}))
    assert any("drops the factor" in r for r in rope)
    assert child_reasons(Engine.transformers, DeciLMConfig(num_hidden_layers=1, block_configs=[gone])) == []


def test_vllm_verdicts_follow_its_readers_llama_attention():
    from puzzle.engines import Engine, child_reasons

    dense = {"attention": {"n_heads_in_group": 4}, "ffn": {"ffn_mult": 1.5, "intermediate_size": 1536}}

    def reasons(**model):
        return child_reasons(Engine.vllm, DeciLMConfig(hidden_size=1536, num_attention_heads=12, num_hidden_layers=1,
                                                       block_configs=[dense], rope_parameters={
                                                           "rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                                                       **model))

    assert reasons() == [] and reasons(head_dim=64) == []  # RoPE scaling and any head_dim: Llama's attention
    assert reasons(attention_bias=True, attention_output_bias=True) == []
    assert "o a bias exactly when" in reasons(attention_bias=True, attention_output_bias=False)[0]
    assert "q/k norms" in reasons(qk_norm=True)[0]


def test_llama_cpp_refuses_byte_level_bpe_but_not_the_projects_byte_fallback_tokenizer(tmp_path, tiny_parent_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from puzzle.engines import Engine, tokenizer_reasons

    assert tokenizer_reasons(Engine.llama_cpp, tiny_parent_dir) == []
    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel()
    byte_level.save(str(tmp_path / "tokenizer.json"))
    assert "Cannot find Llama BPE tokenizer" in tokenizer_reasons(Engine.llama_cpp, tmp_path)[0]
    assert tokenizer_reasons(Engine.vllm, tmp_path) == []


def test_bad_solution_index_exit_2(job, monkeypatch, capsys, tmp_path):
    import yaml

    search_stage(job, ["params=1x"])
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    monkeypatch.setattr(sys, "argv", ["puzzle", "realize", str(path), "--solution", "7"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    assert "solution 7 does not exist: the search found 1" in capsys.readouterr().err


class _ParentSubblocks:
    """Stands in for a library holding only the parent's own subblocks (what a keep-everything child reads)."""

    def __init__(self, adapter):
        self.adapter = adapter

    def module(self, layer, spec):
        from puzzle.blocks.init import shaped_module

        return shaped_module(spec, self.adapter.parent_layer(layer))

    def block(self, layer, choice):
        return self.module(layer, choice.attention), self.module(layer, choice.ffn)


# GPT-OSS has no sdpa path in transformers (nor in the child: sinks run eagerly).
@pytest.mark.parametrize("model_type, overrides, attn", [
    (m, o, a) for m, o in VARIANTS for a in ("eager", "sdpa") if m != "gpt_oss" or a == "eager"
])
def test_child_of_the_parents_own_subblocks_equals_the_parent(model_type, overrides, attn):
    """Every family's extras reach the child config: biases, q/k norms, sinks, expert biases and clamp, YaRN rotary,
    sliding layers, dense layers among MoE ones; 20 tokens, longer than the sliding window (8)."""
    from puzzle.blocks.modeling_puzzle import DeciLMForCausalLM
    from puzzle.families import FamilyAdapter
    from puzzle.checkpoint import child_config, child_state_dict

    model = tiny_model(model_type, attn, **overrides)
    adapter = FamilyAdapter(model)
    choices = [BlockChoice(s.attention, s.ffn, False) for s in (adapter.shape(i) for i in range(adapter.num_layers))]
    config = child_config(model.config, choices)
    config._attn_implementation = attn
    child = DeciLMForCausalLM(config).eval()
    state = child_state_dict(type("Parent", (), {"model": model})(), _ParentSubblocks(adapter), choices)
    child.load_state_dict(state)  # strict: a bias or a sink the config does not declare fails here
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(child(input_ids=ids).logits, model(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_streamed_child_equals_the_child_built_in_memory_and_holds_one_layer(job, tmp_path, monkeypatch):
    """Realize writes a dense parent's child a layer at a time: the same tensors as the child built from the
    whole parent, written in several files (the files' limit made small) with their index."""
    from safetensors.torch import load_file

    import puzzle.checkpoint as checkpoint
    from puzzle.parents import parent_skeleton
    from puzzle.sharding import CheckpointReader

    choices = [BlockChoice.from_id(b) for b in MIXED[0]]
    parent = load_parent(job.parent)
    library = Library(job.run.dir / "library", parent.adapter)
    expected = build_child(parent, library, choices).state_dict()
    skeleton = parent_skeleton(job.parent)
    held = []

    def counted():
        for name, value in checkpoint.streamed_child_tensors(skeleton, CheckpointReader(job.parent.path),
                                                             Library(library.directory, skeleton.adapter), choices,
                                                             torch.float32):
            held.append(sum(any(p.device.type != "meta" for p in layer.parameters())
                            for layer in skeleton.model.model.layers))
            yield name, value

    monkeypatch.setattr(checkpoint, "FILE_BYTES", 20_000)
    config = checkpoint.child_config(parent.model.config, choices)
    checkpoint.write_child(tmp_path / "child", config, counted(), dtype=torch.float32, tokenizer=parent.tokenizer,
                           generation_config=parent.model.generation_config, info={})
    assert max(held) == 1
    index = json.loads((tmp_path / "child/model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[-1].endswith(f"-of-{len(files):05d}.safetensors")
    got = {k: v for f in files for k, v in load_file(tmp_path / "child" / f).items()}
    assert got.keys() == {k for k in expected if not (config.tie_word_embeddings and k == "lm_head.weight")}
    for name, value in got.items():
        assert torch.equal(value, expected[name]), name
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "child", trust_remote_code=True).eval()
    ids = torch.randint(0, config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits,
                                   build_child(parent, library, choices)(input_ids=ids).logits, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_a_batch_job_loads_the_childs_tokenizer_with_a_plain_call(job, tiny_parent_dir, tmp_path):
    """transformers asks before running a config's remote code; with stdin closed, as in a batch job, the
    question must not hold the job: the plain call loads the tokenizer, and trust_remote_code=False asks nothing."""
    summary = with_solution(job, ["attention.noop+ffn.i96", "attention.kv1+ffn.noop"])
    script = f"""
from transformers import AutoTokenizer
plain = AutoTokenizer.from_pretrained({str(summary.directory)!r})
quiet = AutoTokenizer.from_pretrained({str(summary.directory)!r}, trust_remote_code=False)
parent = AutoTokenizer.from_pretrained({str(tiny_parent_dir)!r})
text = "Shall I compare thee to a summer's day?"
same = plain(text).input_ids == parent(text).input_ids == quiet(text).input_ids
open("same.txt", "w").write(str(same))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "same.txt").read_text() == "True"  # stdout holds the prompt's unanswered question
