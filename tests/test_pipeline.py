"""`puzzle run`: the whole job, resumed after kills, several jobs on one library, and the report."""

import json
import shutil
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import puzzle.distill.bld as bld
import puzzle.distill.kd as kd
from tests.helpers import ROOT, cli, library_tensors, pipeline_job

# Deterministic costs (roofline) so that runs can be compared output for output.
PIPELINE = {
    "profile": {"device": "h100"},
    "bld": {"tokens_per_candidate": 8 * 2 * 32, "checkpoint_every": 2},
    "kd": {"tokens": 1024, "batch_size": 2, "eval_blocks": 2, "checkpoint_every": 2},
    "eval": {"validation_blocks": 4, "batch_size": 2, "speed_repeats": 1, "speed_warmup": 0},
}


def outputs(run):
    """Everything a run produces that must not depend on being interrupted (speeds are measured, so left out)."""
    results = json.loads((run / "eval/results.json").read_text())
    quality = [(m["name"], m["kl"], m["perplexity"], m["top1"], m["parameters"]) for m in results["models"]]
    solutions = json.loads((run / "search/solutions.json").read_text())["solutions"]
    return {
        "library": library_tensors(run),
        "scores": (run / "scores/scores.csv").read_text(),
        "solutions": solutions,
        "child": load_file(run / "child/checkpoint/model.safetensors"),
        "kd": load_file(run / "kd/checkpoint/model.safetensors"),
        "kd_summary": {k: v for k, v in json.loads((run / "kd/summary.json").read_text()).items() if k != "seconds"},
        "quality": quality,
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict) and a[key] and isinstance(next(iter(a[key].values())), torch.Tensor):
            assert a[key].keys() == b[key].keys()
            for name in a[key]:
                torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=0, msg=f"{key} {name}")
        else:
            assert a[key] == b[key], key


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_parent_dir):
    """One uninterrupted run: what every interrupted or partial run must reproduce."""
    from puzzle.cli import main

    tmp = tmp_path_factory.mktemp("pipeline_reference")
    path = pipeline_job(tmp, tiny_parent_dir, **PIPELINE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["puzzle", "run", str(path)])
        with pytest.raises(SystemExit) as exit_:
            main()
    assert exit_.value.code in (0, None)
    return tmp / "run"


@pytest.mark.slow
def test_run_goes_from_parent_to_report(reference):
    for stage in ("parent", "library", "scores", "profile", "search", "child", "kd", "eval"):
        assert json.loads((reference / stage / "manifest.json").read_text())["status"] == "done", stage
    results = json.loads((reference / "eval/results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["parent", "child", "child + KD"]
    assert results["models"][0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert results["models"][0]["top1"] == 1.0
    assert results["models"][1]["parameters"] <= 0.7 * results["models"][0]["parameters"]


@pytest.mark.slow
def test_report_has_the_architecture_table_and_the_plots(reference):
    page = (reference / "report/report.html").read_text()
    child = json.loads((reference / "child/checkpoint/puzzle_child.json").read_text())
    assert "Child architecture" in page and "Parent and child" in page
    for layer in child["layers"]:
        assert f"<td>{layer['attention']}</td>" in page
    assert page.count('src="data:image/png;base64,') == 3  # architecture, frontier, KD curve
    md = (reference / "report/report.md").read_text()
    assert "| layer | attention | FFN | block score |" in md and "| KL(parent ‖ model) |" in md
    for name in ("architecture.png", "frontier.png", "kd.png"):
        assert f"]({name})" in md
        assert (reference / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["bld", "kd"])
def test_run_killed_in_the_middle_resumes_to_the_same_outputs(reference, where, tmp_path, tiny_parent_dir,
                                                              monkeypatch, capsys):
    path = pipeline_job(tmp_path, tiny_parent_dir, **PIPELINE)
    module = bld if where == "bld" else kd
    real = module.save_checkpoint

    def killed_after_saving(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "save_checkpoint", killed_after_saving)
    code, (_, err) = cli(monkeypatch, capsys, "run", path)
    assert code == 130 and "run the command again to resume" in err
    stage = "library" if where == "bld" else "kd"
    assert json.loads((tmp_path / "run" / stage / "manifest.json").read_text())["status"] == "failed"
    monkeypatch.setattr(module, "save_checkpoint", real)
    code, (_, err) = cli(monkeypatch, capsys, "run", path)
    assert code == 0, err
    assert_same(outputs(tmp_path / "run"), outputs(reference))


@pytest.mark.slow
def test_multi_job_file_trains_the_library_once(tmp_path, tiny_parent_dir, monkeypatch, capsys):
    path = pipeline_job(tmp_path, tiny_parent_dir, **PIPELINE)
    raw = yaml.safe_load(path.read_text())
    del raw["search"]
    raw["jobs"] = {"light": {"search": {"budgets": {"params": "0.9x"}}},
                   "impossible": {"search": {"budgets": {"params": "10"}}},
                   "heavy": {"search": {"budgets": {"params": "0.6x"}}, "kd": {"tokens": 512}}}
    path.write_text(yaml.safe_dump(raw))
    code, (out, err) = cli(monkeypatch, capsys, "run", path)
    # The impossible job stops with its reason; the jobs before and after it still finish.
    assert code == 2 and "job impossible stopped: budget params=10 cannot be met" in err.splitlines()[-1]
    run = tmp_path / "run"
    assert json.loads((run / "library/manifest.json").read_text())["runs"] == 1
    assert json.loads((run / "scores/manifest.json").read_text())["runs"] == 1
    for name, limit in (("light", 0.9), ("heavy", 0.6)):
        results = json.loads((run / "jobs" / name / "eval/results.json").read_text())
        assert results["models"][1]["parameters"] <= limit * results["models"][0]["parameters"]
        assert (run / "jobs" / name / "report/report.html").is_file()
        assert f"job {name}: report: {run / 'jobs' / name / 'report/report.html'}" in out
    assert json.loads((run / "jobs/heavy/kd/summary.json").read_text())["steps"] == 4
    assert json.loads((run / "jobs/light/kd/summary.json").read_text())["steps"] == 8
    # One job alone, again: everything is reused.
    code, (_, err) = cli(monkeypatch, capsys, "run", path, "--job", "heavy")
    assert code == 0, err
    assert json.loads((run / "jobs/heavy/kd/manifest.json").read_text())["runs"] == 1


def test_a_job_cannot_change_a_shared_stage(tmp_path, tiny_parent_dir, monkeypatch, capsys):
    path = pipeline_job(tmp_path, tiny_parent_dir)
    raw = yaml.safe_load(path.read_text())
    raw["jobs"] = {"a": {"bld": {"batch_size": 8}}, "b": {"search": {"budgets": {"params": "0.5x"}}}}
    raw["kd"]["tokens"] = 0
    path.write_text(yaml.safe_dump(raw))
    code, (_, err) = cli(monkeypatch, capsys, "validate", path)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()[1:]
    assert any(line.strip().startswith("jobs.a.bld: a job can set only search, realize, kd, eval") for line in lines)
    # A problem of the shared sections is reported once, not once per job.
    assert sum("kd.tokens: got 0" in line for line in lines) == 1
    raw["jobs"] = {"a": {}, "b": {}}
    raw["kd"]["tokens"] = 256
    path.write_text(yaml.safe_dump(raw))
    code, (_, err) = cli(monkeypatch, capsys, "run", path, "--job", "c")
    assert code == 2 and "--job: got 'c'; the jobs of this file are a, b" in err


@pytest.mark.parametrize(
    "command, missing",
    [("eval", "child/checkpoint does not exist; run `puzzle realize` first"),
     ("report", "search/solutions.json does not exist; run `puzzle search` first")],
)
def test_stage_outputs_that_do_not_exist_are_named(tmp_path, tiny_parent_dir, monkeypatch, capsys, command, missing):
    code, (_, err) = cli(monkeypatch, capsys, command, pipeline_job(tmp_path, tiny_parent_dir))
    assert code == 2 and missing in err and "Traceback" not in err


def test_eval_task_without_lm_eval_installed(tmp_path, tiny_parent_dir, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "lm_eval" else real(name, *a, **k))
    path = pipeline_job(tmp_path, tiny_parent_dir, eval={"tasks": ["hellaswag"]})
    code, (_, err) = cli(monkeypatch, capsys, "run", path)
    assert code == 2 and "eval.tasks: got ['hellaswag']; lm-evaluation-harness is not installed" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_local_lm_eval_task_runs_on_parent_and_children_and_reaches_results_and_report(
        reference, tmp_path, tiny_parent_dir, monkeypatch, capsys):
    task = str(ROOT / "examples/tasks/shakespeare_cloze.yaml")
    path = pipeline_job(tmp_path, tiny_parent_dir, **PIPELINE)
    shutil.copytree(reference, tmp_path / "run")
    code, (_, err) = cli(monkeypatch, capsys, "run", path, "--set", f"eval.tasks=[{task}]", "--set", "eval.task_limit=24")
    assert code == 0, err
    models = json.loads((tmp_path / "run/eval/results.json").read_text())["models"]
    accuracies = [m["tasks"]["shakespeare_cloze"]["acc,none"] for m in models]
    assert [m["tasks"]["shakespeare_cloze"]["sample_len"] for m in models] == [24, 24, 24]
    assert all(0 <= a <= 1 for a in accuracies) and len(models) == 3
    report = (tmp_path / "run/report/report.md").read_text()
    assert "shakespeare_cloze accuracy" in report and f"{accuracies[0]:.1%}" in report


@pytest.mark.slow
def test_eval_reuses_its_results_until_the_child_changes(reference, tmp_path, tiny_parent_dir, monkeypatch, capsys):
    path = pipeline_job(tmp_path, tiny_parent_dir, **PIPELINE)
    shutil.copytree(reference, tmp_path / "run")
    code, (_, err) = cli(monkeypatch, capsys, "eval", path)
    assert code == 0, err
    assert json.loads((tmp_path / "run/eval/manifest.json").read_text())["runs"] == 1
    code, (_, err) = cli(monkeypatch, capsys, "run", path, "--set", "kd.learning_rate=0.002")
    assert code == 0, err
    assert json.loads((tmp_path / "run/kd/manifest.json").read_text())["runs"] == 2
    assert json.loads((tmp_path / "run/eval/manifest.json").read_text())["runs"] == 2
