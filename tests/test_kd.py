"""Global KD: it brings the child closer to the parent, resumes exactly, and shards over processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import puzzle.distill.kd as kd
from puzzle.distill.kd import cosine_loss, kl_divergence
from puzzle.config import load_config
from puzzle.api import kd_stage
from tests.helpers import FAST, cli, scored_job, with_solution, write_job

KD = ["kd.tokens=2048", "kd.batch_size=2", "kd.eval_blocks=4", "kd.learning_rate=0.001", "kd.checkpoint_every=4"]
# A child far enough from the parent for KD to have something to recover.
DAMAGED = ["attention.kv1+ffn.linear", "attention.noop+ffn.i48"]


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_parent_dir, fast_scored):
    path, config = scored_job(tmp_path_factory.mktemp("kd"), tiny_parent_dir, FAST + ["profile.device=h100"] + KD,
                              start_from=fast_scored)
    with_solution(config, DAMAGED)
    return path, config


def weights(directory):
    return load_file(directory / "model.safetensors")


def test_losses_are_zero_for_the_parent_itself():
    logits = torch.randn(2, 5, 11)
    states = [torch.randn(2, 5, 8) for _ in range(3)]
    assert kl_divergence(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(states, states).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_divergence(logits, torch.zeros_like(logits)).item() > 0.01


def test_kd_lowers_the_childs_kl_to_the_parent(job):
    _, config = job
    summary = kd_stage(config)
    assert summary.steps == 2048 // (2 * 64)
    assert summary.after["kl"] < 0.8 * summary.before["kl"]
    assert summary.after["cosine"] < summary.before["cosine"]
    # The distilled child is saved like the realized one and loads the same way.
    info = json.loads((summary.directory / "puzzle_child.json").read_text())
    assert [x["attention"] + "+" + x["ffn"] for x in info["layers"]] == DAMAGED and info["kd"]["steps"] == 16
    assert (summary.directory / "modeling_puzzle.py").is_file()
    log = (config.run.dir / "kd/train_log.csv").read_text().splitlines()
    assert log[0] == "step,total,kl,cosine,lm" and len(log) == 17
    assert not (config.run.dir / "kd/resume").exists() or not any((config.run.dir / "kd/resume").iterdir())


def test_kd_killed_after_a_checkpoint_resumes_to_the_same_child(job, tmp_path, monkeypatch):
    _, reference = job
    expected = weights(kd_stage(reference).directory)
    config = load_config(write_job(tmp_path, reference.parent.path), FAST + ["profile.device=h100"] + KD)
    import shutil

    for stage in ("library", "scores", "profile", "search", "child"):
        shutil.copytree(reference.run.dir / stage, config.run.dir / stage)
    real = kd.save_checkpoint

    def killed_after_saving(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(kd, "save_checkpoint", killed_after_saving)
    with pytest.raises(KeyboardInterrupt):
        kd_stage(config)
    assert json.loads((config.run.dir / "kd/manifest.json").read_text())["status"] == "failed"
    monkeypatch.setattr(kd, "save_checkpoint", real)
    resumed = weights(kd_stage(config).directory)
    assert resumed.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [[], ["kd.shard=true", "kd.activation_checkpointing=true"]],
                         ids=["ddp", "fsdp2-checkpointed"])
def test_kd_on_two_processes_matches_one(job, tmp_path, sharding):
    path, reference = job
    expected = weights(kd_stage(reference).directory)
    import shutil

    run = tmp_path / "two"
    for stage in ("library", "scores", "profile", "search", "child"):
        shutil.copytree(reference.run.dir / stage, run / stage)
    args = [a for f in FAST + ["profile.device=h100"] + KD + sharding + [f"run.dir={run}"] for a in ("--set", f)]
    result = subprocess.run(
        [sys.executable, "-m", "puzzle", "kd", str(path), *args, "--num-processes", "2"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((run / "kd/manifest.json").read_text())
    assert manifest["outputs"]["parallel"] == ("fsdp2" if sharding else "ddp")
    got = weights(run / "kd/checkpoint")
    # Gradients are averaged across processes, so only the summation order differs from one process.
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "override, message",
    [
        ("kd.tokens=0", "kd.tokens: got 0; Input should be greater than or equal to 1"),
        ("kd.tokens=100", "kd.tokens: got 100; one step takes kd.batch_size × data.sequence_length = 128 tokens"),
        ("kd.child=/nonexistent/child", "kd.child: '/nonexistent/child' is not a child checkpoint"),
        ("kd.kl_weight=0", "nothing to train on"),
    ],
)
def test_kd_bad_input_exits_2(job, monkeypatch, capsys, override, message):
    path, config = job
    args = [a for f in FAST + KD + ["kd.cosine_weight=0", override] for a in ("--set", f)]
    code, out = cli(monkeypatch, capsys, "kd", path, *args)
    assert code == 2 and message in out.err and "Traceback" not in out.err


def test_kd_before_realize_names_the_missing_stage(tmp_path, tiny_parent_dir, monkeypatch, capsys):
    path = write_job(tmp_path, tiny_parent_dir)
    code, out = cli(monkeypatch, capsys, "kd", path, "--set", "kd.tokens=256", "--set", "kd.batch_size=2")
    assert code == 2 and "child/checkpoint does not exist; run `puzzle realize` first" in out.err
    assert len(out.err.strip().splitlines()) == 1


def _fsdp_run(rank: int, world: int, port: int, child_dir: str, parent_dir: str, work: str, offload: bool) -> None:
    """One rank of a sharded KD (child and teacher) that dies right after its second checkpoint, then resumes,
    the second time with the child's shards offloaded to the host (spawned)."""
    import torch.distributed as dist

    from puzzle.checkpoint import load_child_sharded
    from puzzle.config import ParentSection
    from puzzle.parents import load_parent

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    adapter = load_parent(ParentSection(path=parent_dir), sharded=True).adapter  # the teacher sharded too
    blocks, settings = _fsdp_data(adapter.config.vocab_size)
    real_save, real_losses, trained = kd.save_checkpoint, kd.kd_losses, []

    def save_then_die(directory, modules, optimizer, state, tag):
        real_save(directory, modules, optimizer, state, tag)
        if state.step == 4:
            raise KeyboardInterrupt

    def counted(*args):
        if torch.is_grad_enabled():
            trained.append(1)
        return real_losses(*args)

    kd.save_checkpoint, kd.kd_losses = save_then_die, counted
    try:
        kd.distill(load_child_sharded(Path(child_dir), torch.float32, torch.device("cpu")), adapter.states_and_logits,
                   blocks, blocks[:2], settings, Path(work) / "resume", rank, world)
    except KeyboardInterrupt:
        pass
    assert len(trained) == 4
    trained.clear()
    child = load_child_sharded(Path(child_dir), torch.float32, torch.device("cpu"), offload=offload)
    kd.distill(child, adapter.states_and_logits, blocks, blocks[:2], settings, Path(work) / "resume", rank, world)
    from puzzle.sharding import full_tensors

    whole = dict(full_tensors(child))  # every rank gathers
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in whole.items()}, str(Path(work) / "sharded.safetensors"))
        (Path(work) / "steps.json").write_text(json.dumps(len(trained)))
    dist.destroy_process_group()


def _fsdp_data(vocab: int):
    blocks = torch.randint(0, vocab, (8, 16), generator=torch.Generator().manual_seed(0))
    settings = kd.KdSettings(learning_rate=1e-3, schedule="constant", warmup_fraction=0.0, steps=6, batch_size=2,
                             seed=0, checkpoint_every=2)
    return blocks, settings


@pytest.mark.slow
def test_sharded_kd_killed_after_a_checkpoint_resumes_and_equals_one_process(job, tmp_path):
    import socket

    import torch.multiprocessing as mp

    from puzzle.checkpoint import load_child
    from puzzle.parents import load_parent

    _, config = job
    child_dir = config.run.dir / "child/checkpoint"
    if not child_dir.is_dir():
        from puzzle.api import realize_stage

        realize_stage(config)
    adapter = load_parent(config.parent).adapter
    blocks, settings = _fsdp_data(adapter.config.vocab_size)
    child = load_child(child_dir, torch.float32)
    kd.distill(child, adapter.states_and_logits, blocks, blocks[:2], settings, tmp_path / "one")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_fsdp_run, args=(2, port, str(child_dir), str(config.parent.path), str(tmp_path), True),
                       nprocs=2, start_method="spawn")
    # Steps 5 and 6 only: the rest came from the checkpoints each rank saved of its own shards.
    assert json.loads((tmp_path / "steps.json").read_text()) == 6 - 4
    got = load_file(tmp_path / "sharded.safetensors")
    for name, value in child.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)


def _late_rank_run(rank: int, world: int, port: int, path: str, run_dir: str) -> None:
    """One rank of a one-process stage (search) where rank 1 arrives after rank 0 could have finished it (spawned)."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from puzzle.distributed import workers
    from puzzle.pipeline import run_stage
    from puzzle.rundir import RunDir, Stage

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # Short: a rank left waiting in a collective the other skipped fails the test instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    config = load_config(Path(path), [f"run.dir={run_dir}", "profile.device=h100", "search.budgets.latency=0.8x"])
    if rank == 1:
        deadline = time.time() + 10
        while time.time() < deadline and RunDir.of(config).done_fingerprint(Stage.search) is None:
            time.sleep(0.1)
    run_stage(Stage.search, config)
    after = workers().gather(f"after search, rank {rank}")
    (Path(run_dir) / f"rank{rank}.json").write_text(json.dumps(after))
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_rank_that_reaches_a_stage_late_still_takes_part_in_it(job, tmp_path):
    """Whether a stage is already done is rank 0's decision: a rank that looked after rank 0 finished would skip the
    stage's collectives and pair its next ones with them."""
    import shutil
    import socket

    import torch.multiprocessing as mp

    path, reference = job
    for stage in ("library", "scores", "profile"):
        shutil.copytree(reference.run.dir / stage, tmp_path / stage)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_late_rank_run, args=(2, port, str(path), str(tmp_path)), nprocs=2, start_method="spawn")
    expected = ["after search, rank 0", "after search, rank 1"]
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [expected, expected]


@pytest.mark.slow
def test_puzzle_run_on_two_and_four_processes_shards_parent_kd_and_eval_like_one_process(job, tmp_path):
    """`puzzle run --num-processes 2` (and 4): the parent stage and eval with the parent (and the children)
    sharded by FSDP2 over the processes, each measuring its share of the blocks; KD with child and teacher sharded; the
    one-process stages (profile, search, realize, report) on rank 0. Same numbers as one process."""
    import shutil

    path, reference = job
    runs = {n: tmp_path / f"p{n}" for n in (1, 2, 4)}
    for n, run in runs.items():
        for stage in ("library", "scores", "profile"):
            shutil.copytree(reference.run.dir / stage, run / stage)
        settings = (FAST + ["profile.device=h100", "search.budgets.latency=0.8x"] + KD
                    + ["kd.batch_size=4", "kd.shard=true", f"run.dir={run}"])  # 4 splits over 1, 2 and 4 processes
        result = subprocess.run(
            [sys.executable, "-m", "puzzle", "run", str(path), *[a for f in settings for a in ("--set", f)],
             "--num-processes", str(n)], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
            timeout=600,
        )
        if result.returncode != 0:
            (tmp_path / f"stderr{n}.txt").write_text(result.stderr)
        assert result.returncode == 0, _rank_messages(result.stderr)
    for n in (2, 4):
        _same_run(runs[1], runs[n])


def _rank_messages(stderr: str) -> str:
    """The ranks' own messages: torchrun's log lines and its closing traceback would fill any tail."""
    launcher = stderr.rfind("Traceback (most recent call last):")
    if "ChildFailedError" in stderr[launcher:]:
        stderr = stderr[:launcher]
    lines = [line for line in stderr.splitlines() if "torch/distributed/elastic" not in line]
    return "\n".join(lines)[-4000:]


def _same_run(one, two):
    """A multi-process run (`two`) has the numbers of the one-process run (`one`)."""
    manifest = {s: json.loads((two / s / "manifest.json").read_text())["outputs"] for s in ("parent", "kd", "eval")}
    assert manifest["parent"]["parent_sharded"] and manifest["eval"]["sharded"]
    assert manifest["kd"]["parallel"] == "fsdp2" and manifest["kd"]["teacher_sharded"]
    # Each rank holds its share of the parent: here 1/N of every weight (at most 0.6 of it on 2 ranks).
    whole = json.loads((one / "parent/manifest.json").read_text())["outputs"]["parent_bytes_per_rank"]
    assert len(whole) == 1
    for held in (manifest["parent"]["parent_bytes_per_rank"], manifest["eval"]["parent_bytes_per_rank"],
                 manifest["kd"]["teacher_bytes_per_rank"]):
        assert len(held) in (2, 4) and max(held) <= 1.2 * whole[0] / len(held)
    expected_parent, parent = (json.loads((r / "parent/summary.json").read_text()) for r in (one, two))
    assert parent["validation_tokens"] == expected_parent["validation_tokens"]
    assert parent["validation_loss"] == pytest.approx(expected_parent["validation_loss"], rel=1e-5)
    assert (two / "child/checkpoint/puzzle_child.json").read_text() == (one / "child/checkpoint/puzzle_child.json").read_text()
    expected, got = ({m["name"]: m for m in json.loads((r / "eval/results.json").read_text())["models"]} for r in (one, two))
    assert got.keys() == expected.keys() == {"parent", "child", "child + KD"}
    for name, m in got.items():
        # The realized child is the same; the distilled one differs by KD's order of gradient sums.
        rel = 1e-3 if name == "child + KD" else 1e-5
        for key in ("kl", "lm_loss", "top1"):
            assert m[key] == pytest.approx(expected[name][key], rel=rel, abs=1e-6), (name, key)
        assert m["measured_latency"] is None and expected[name]["measured_latency"] > 0  # a sharded model is not timed
    assert "not measured (sharded)" in (two / "report/report.md").read_text()
