"""Global KD: it brings the child closer to the parent, resumes exactly, and shards over processes."""

import json
import os
import subprocess
import sys

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
def test_kd_on_two_processes_matches_one(job, tmp_path):
    path, reference = job
    expected = weights(kd_stage(reference).directory)
    import shutil

    run = tmp_path / "two"
    for stage in ("library", "scores", "profile", "search", "child"):
        shutil.copytree(reference.run.dir / stage, run / stage)
    args = [a for f in FAST + ["profile.device=h100"] + KD + [f"run.dir={run}"] for a in ("--set", f)]
    result = subprocess.run(
        [sys.executable, "-m", "puzzle", "kd", str(path), *args, "--num-processes", "2"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
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
