"""BLD and the library on disk, on a tiny parent: training, resume after a kill, damage, sharding."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import puzzle.distill.bld as bld
from puzzle.distill.schedule import TrainingSettings
from puzzle.distill.library import Library
from puzzle.config import load_config
from puzzle.api import distill_stage
from puzzle.distill.library import bld_candidates
from puzzle.stages.library import job_spaces
from puzzle.parents import load_parent
from puzzle.blocks.specs import AttentionKind, AttentionSpec, FfnKind, FfnSpec
from tests.helpers import copy_run, library_tensors, write_job


def assert_same_library(a: Path, b: Path):
    ta, tb = library_tensors(a), library_tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, msg=k)


@pytest.fixture
def reference(reference_library):
    """One uninterrupted library (the session's, trained once), the reference for the resume, damage and
    sharding tests: (config, summary). Read-only: a test that writes into its run directory copies it."""
    return reference_library


def test_library_trains_every_candidate(reference):
    config, summary = reference
    assert len(summary.rows) == 10  # per layer: kv1, window8, linear attention; i48, linear FFN
    assert {r.subblocks for r in summary.rows if r.layer == 0} == {
        "attention.kv1", "attention.kv2.window8", "attention.linear", "ffn.i48", "ffn.linear",
    }
    # A random tiny parent and 8 steps: held-out loss falls on the whole, not for every candidate
    # (the shipped parent's full library is the per-candidate check, in bench/bld.py and the CLI summary).
    assert sum(r.final_nmse for r in summary.rows) < sum(r.initial_nmse for r in summary.rows)
    # Linear candidates start at their least-squares fit, which 8 steps rarely better: the rest train.
    assert sum(r.final_nmse < r.initial_nmse for r in summary.rows if "linear" not in r.subblocks) >= 4
    assert all(r.initial_nmse < 0.1 for r in summary.rows if r.subblocks == "ffn.linear")
    entry = json.loads((config.run.dir / "library/entries/L01.ffn.i48.json").read_text())
    assert entry["init"] == "channel contribution" and entry["steps"] == 8 and entry["tokens"] == 512
    assert len(entry["sha256"]) == 64
    assert not (config.run.dir / "library/.bld").exists() or not any((config.run.dir / "library/.bld").iterdir())


def test_rerun_skips_finished_candidates(reference, tmp_path):
    _, config = copy_run(reference[0], tmp_path)  # the rerun writes the stage's manifest, table and space
    assert distill_stage(config).trained_now == 0


def test_library_serves_trained_modules(reference):
    config, _ = reference
    parent = load_parent(config.parent)
    library = Library(config.run.dir / "library", parent.adapter)
    module = library.module(1, FfnSpec(FfnKind.dense, 48))
    weights = load_file(config.run.dir / "library/entries/L01.ffn.i48.safetensors")
    torch.testing.assert_close(module.down_proj.weight, weights["ffn.down_proj.weight"])
    noop = library.module(0, AttentionSpec(AttentionKind.noop))
    assert sum(p.numel() for p in noop.parameters()) == 0


def test_killed_run_resumes_to_the_same_library(reference, tmp_path, tiny_parent_dir, monkeypatch):
    config = load_config(write_job(tmp_path, tiny_parent_dir))
    real = bld.parent_activations
    calls = {"n": 0}

    def killed_after_a_checkpoint(*args):
        calls["n"] += 1
        # 2 calibration batches each for FFN scores and linear fits, 1 initial eval batch, then steps 1 and 2
        # (a checkpoint at 2): dies in step 3
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(bld, "parent_activations", killed_after_a_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        distill_stage(config)
    assert len(list((config.run.dir / "library/.bld").glob("*/state.json"))) == 1
    monkeypatch.setattr(bld, "parent_activations", real)
    distill_stage(config)
    assert_same_library(config.run.dir, reference[0].run.dir)


def test_damaged_entry_is_retrained_not_used(reference, tmp_path, tiny_parent_dir):
    import shutil

    config = load_config(write_job(tmp_path, tiny_parent_dir))
    shutil.copytree(reference[0].run.dir / "library", config.run.dir / "library")
    victim = config.run.dir / "library/entries/L00.attention.linear.safetensors"
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    (config.run.dir / "library/entries/L01.ffn.linear.json").write_text('{"half": ')  # as if cut mid-write
    summary = distill_stage(config)
    assert summary.trained_now == 2
    assert_same_library(config.run.dir, reference[0].run.dir)


def test_one_parent_forward_per_batch_feeds_every_candidate(tiny_parent_dir, tmp_path, monkeypatch):
    config = load_config(write_job(tmp_path, tiny_parent_dir))
    adapter = load_parent(config.parent).adapter
    shapes = [adapter.shape(i) for i in range(adapter.num_layers)]
    # Pruned FFNs need calibration scores; the other candidates are enough to count passes.
    candidates = [
        c for c in bld_candidates(job_spaces(config, shapes), shapes) if not (c.ffn and c.ffn.kind is FfnKind.dense)
    ]
    modules = torch.nn.ModuleDict({c.module_name: bld.build_module(c, adapter, None, "sdpa") for c in candidates})
    passes = {"n": 0}
    embed = adapter.embed

    def counting_embed(ids):
        passes["n"] += 1
        return embed(ids)

    monkeypatch.setattr(adapter, "embed", counting_embed)
    settings = TrainingSettings(1e-3, "cosine", 0.0, steps=3, batch_size=2, seed=0, checkpoint_every=100)
    blocks = torch.randint(0, 300, (8, 16))
    bld.train_candidates(candidates, modules, adapter, blocks, blocks[:2], settings, tmp_path / "ckpt")
    assert len(candidates) == 8
    # 3 training steps plus the initial and final evaluation (one batch each), whatever the candidate count.
    assert passes["n"] == 3 + 2


@pytest.mark.slow
@pytest.mark.parametrize("processes, placement", [(2, "replicated"), (2, "layers")])
def test_two_processes_equal_one(reference, tmp_path, tiny_parent_dir, processes, placement):
    """'layers': each process holds half the parent's layers and the residual stream passes between them."""
    job = write_job(tmp_path, tiny_parent_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "puzzle", "distill", str(job), "--num-processes", str(processes),
         "--set", f"run.parent_placement={placement}"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    entries = sorted(p.name for p in (tmp_path / "job/library/entries").glob("*.json"))
    assert len(entries) == 10
    assert_same_library(tmp_path / "job", reference[0].run.dir)
    outputs = json.loads((tmp_path / "job/library/manifest.json").read_text())["outputs"]
    assert outputs["parent_placement"] == placement
    if placement == "layers":  # each process held about half the parent
        assert max(outputs["parent_bytes_per_rank"]) <= 0.6 * outputs["parent_bytes"], outputs


# `python -m puzzle ...` whose BLD holds still in the first parent forward after its first checkpoint: a SIGKILL
# sent once that checkpoint is on disk lands mid-training whatever the machine's load (it would otherwise race
# the few remaining steps). The hold ends on its own after 5 minutes, should nothing kill the process.
HELD_AFTER_THE_FIRST_CHECKPOINT = """
import runpy, sys, time
import puzzle.distill.bld as bld

real_save, real_forward, saved = bld.save_checkpoint, bld.parent_activations, []

def save_checkpoint(*args, **kwargs):
    real_save(*args, **kwargs)
    saved.append(True)

def parent_activations(*args, **kwargs):
    if saved:
        time.sleep(300)
    return real_forward(*args, **kwargs)

bld.save_checkpoint, bld.parent_activations = save_checkpoint, parent_activations
sys.argv = ["puzzle", *sys.argv[1:]]
runpy.run_module("puzzle", run_name="__main__")
"""


@pytest.mark.slow
def test_sigkill_at_any_moment_resumes_to_the_same_library(reference, tmp_path, tiny_parent_dir):
    job = write_job(tmp_path, tiny_parent_dir, tokens_per_candidate=8 * 2 * 32)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "puzzle", "distill", str(job)]
    log = tmp_path / "killed.stderr"
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", HELD_AFTER_THE_FIRST_CHECKPOINT, "distill", str(job)],
                                stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    checkpoints = tmp_path / "job/library/.bld"
    try:
        deadline = time.time() + 300
        while not any(checkpoints.glob("*/state.json")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The kill landed mid-training: the process died of it (it had not finished, nor failed before), a
    # partial BLD checkpoint is on disk and the library is not complete.
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, log.read_text()[-2000:])
    assert len(list(checkpoints.glob("*/state.json"))) == 1
    assert len(list((tmp_path / "job/library/entries").glob("*.json"))) < len(reference[1].rows)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_library(tmp_path / "job", reference[0].run.dir)


def test_coupled_pairs_are_trained_and_scored_together(tmp_path, tiny_parent_dir):
    from puzzle.api import score_stage

    job = write_job(tmp_path, tiny_parent_dir, coupled_pairs=["attention.kv1+ffn.i48"], tokens_per_candidate=2 * 2 * 32)
    config = load_config(job, ["scoring.validation_blocks=1"])
    summary = distill_stage(config)
    coupled = [r for r in summary.rows if "+" in r.subblocks]
    assert [r.key for r in coupled] == ["L00.attention.kv1+ffn.i48", "L01.attention.kv1+ffn.i48"]
    weights = load_file(config.run.dir / "library/entries/L00.attention.kv1+ffn.i48.safetensors")
    assert any(k.startswith("attention.") for k in weights) and any(k.startswith("ffn.") for k in weights)
    scores = score_stage(config).frame
    pairs = scores[scores.coupled]
    assert len(pairs) == 2 and set(pairs.attention) == {"attention.kv1"} and set(pairs.ffn) == {"ffn.i48"}
    # The same blocks composed from decoupled candidates are scored too, as separate rows.
    assert len(scores[(scores.attention == "attention.kv1") & (scores.ffn == "ffn.i48")]) == 4
    with pytest.raises(Exception, match="not in the library"):
        distill_stage(load_config(write_job(tmp_path, tiny_parent_dir, name="bad", coupled_pairs=["attention.kv1+ffn.i7"])))


@pytest.mark.parametrize("family, bias", [("llama", False), ("llama", True), ("nemotron_h", False)])
def test_a_linear_candidate_starts_at_the_least_squares_fit_of_its_subblock(family, bias):
    """On calibration tokens the fitted start is the least-squares one (against torch's solver) and far nearer
    the parent than the weight products; fitting one subblock per pass changes nothing."""
    from puzzle.families import family_adapter
    from tests.tiny import tiny_model

    adapter = family_adapter(tiny_model(family, attention_bias=bias))
    layers = {"llama": (0, 1), "nemotron_h": (1,)}[family]  # the hybrid's MLP layer; its attention is never linear
    candidates = [bld.Candidate(i, ffn=FfnSpec(FfnKind.linear)) for i in layers]
    if family == "llama":
        candidates.append(bld.Candidate(1, attention=AttentionSpec(AttentionKind.linear)))
    calibration = torch.randint(0, 128, (8, 48), generator=torch.Generator().manual_seed(0))
    slots = bld.linear_slots(candidates, adapter)
    assert [s.bias for s in slots if s.attention] == ([bias] if family == "llama" else [])
    fits = bld.linear_fits(adapter, calibration, 4, slots, per_pass=len(slots))
    one_at_a_time = bld.linear_fits(adapter, calibration, 4, slots, per_pass=1)
    acts = bld.parent_activations(adapter, calibration)
    for candidate, slot in zip(sorted(candidates, key=lambda c: (c.layer, c.ffn is not None)), slots):
        torch.testing.assert_close(one_at_a_time[slot].weight, fits[slot].weight)
        target = acts.attention_delta[slot.layer] if slot.attention else acts.block_delta[slot.layer]
        x, y = bld._slot_io(adapter, acts, slot)
        if slot.bias:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        exact = ((x @ torch.linalg.lstsq(x, y).solution - y).pow(2).mean() / y.pow(2).mean()).item()
        with torch.no_grad():
            fitted = bld.normalized_mse(bld.predict(candidate, bld.build_module(candidate, adapter, None, "sdpa", fits),
                                                    adapter, acts), target).item()
            product = bld.normalized_mse(bld.predict(candidate, bld.build_module(candidate, adapter, None, "sdpa"),
                                                     adapter, acts), target).item()
        if not slot.attention:  # the FFN's target includes the parent's attention, which both keep
            fitted_only = ((x @ torch.cat([fits[slot].weight.T, fits[slot].bias[None]]) if slot.bias
                            else x @ fits[slot].weight.T) - y).pow(2).mean().item() / y.pow(2).mean().item()
            assert fitted_only == pytest.approx(exact, rel=0.02, abs=1e-4)
        assert fitted < 0.5 * product, (slot, fitted, product)
