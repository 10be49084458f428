"""What a kill leaves behind is found and set right: a directory swap cut in half, a manifest left running."""

import json

import torch
from torch import nn

from puzzle.distill.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from puzzle.io import atomic_dir, atomic_write_json
from puzzle.rundir import RunDir, Stage


def _training_state(tmp_path):
    torch.manual_seed(0)
    modules = nn.ModuleDict({"m": nn.Linear(4, 4)})
    optimizer = torch.optim.AdamW(modules.parameters(), lr=1e-3)
    modules["m"](torch.randn(2, 4)).sum().backward()
    optimizer.step()
    directory = tmp_path / "ckpt"
    save_checkpoint(directory, modules, optimizer, TrainingState(step=7, log=[{"step": 7}]), tag="t")
    return directory, modules


def test_a_kill_between_the_two_renames_of_a_directory_swap_loses_no_training_state(tmp_path):
    directory, modules = _training_state(tmp_path)
    # The one instant atomic_dir has moved the old checkpoint aside and not yet put the new one in its place.
    directory.rename(tmp_path / ".ckpt.old")
    assert not directory.exists()
    fresh = nn.ModuleDict({"m": nn.Linear(4, 4)})
    state = load_checkpoint(directory, fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-3), tag="t")
    assert state is not None and state.step == 7 and state.log == [{"step": 7}]
    assert torch.equal(fresh["m"].weight, modules["m"].weight)
    assert directory.is_dir() and not (tmp_path / ".ckpt.old").exists()


def test_the_next_write_of_a_half_swapped_directory_leaves_one_directory(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("old")
    target.rename(tmp_path / ".out.old")
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_manifest_left_running_by_a_dead_process_is_marked_interrupted(tmp_path):
    run = RunDir(tmp_path)
    atomic_write_json(run.stage_dir(Stage.scores) / "manifest.json",
                      {"stage": "scores", "status": "running", "fingerprint": "k", "runs": 1})
    atomic_write_json(run.stage_dir(Stage.kd) / "manifest.json",
                      {"stage": "kd", "status": "running", "fingerprint": "k", "runs": 1})
    with RunDir(tmp_path).lock(Stage.kd):  # a live process is still writing kd
        assert run.mark_interrupted() == [Stage.scores]
    assert json.loads((tmp_path / "scores/manifest.json").read_text())["status"] == "interrupted"
    assert json.loads((tmp_path / "kd/manifest.json").read_text())["status"] == "running"
    assert not run.is_done(Stage.scores, "k")
