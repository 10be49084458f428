"""`puzzle validate` finds every budget, sweep and device problem of a job at once, before any work."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _job(tmp_path: Path, **sections) -> Path:
    raw = {"parent": {"path": str(ROOT / "examples/parent")},
           "data": {"files": [str(ROOT / "examples/data/shakespeare/sonnets.txt")]},
           "run": {"dir": str(tmp_path / "run")}, **sections}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _puzzle(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "puzzle", *args], capture_output=True, text=True, timeout=120)


def test_budget_sweep_and_device_problems_are_reported_together_before_anything_is_written(tmp_path):
    path = _job(tmp_path, profile={"device": "h1000"}, search={"budgets": {"latency": "fast"}})
    result = _puzzle("validate", str(path), "--budget", "memory=5XB", "--sweep", "latency=1:2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].endswith("4 problem(s)")
    assert any(line.startswith("  profile.device: got 'h1000'; unknown device 'h1000'") for line in lines)
    assert any(line.startswith("  search.budgets: got {'latency': 'fast'}; budget 'latency=fast'") for line in lines)
    assert any(line.startswith("  budget 'memory=5XB': unknown unit 'xb' for memory") for line in lines)
    assert any(line.startswith("  --sweep 'latency=1:2': expected KIND=LOW:HIGH:STEPS") for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


@pytest.mark.slow
def test_a_budget_given_twice_on_the_command_line_names_both(tmp_path):
    result = _puzzle("validate", str(_job(tmp_path)), "--budget", "latency=0.3x", "--budget", "latency=0.9x")
    assert result.returncode == 2
    assert "--budget 'latency=0.9x': latency is already given as 'latency=0.3x'" in result.stderr


@pytest.mark.slow
def test_a_valid_job_with_budgets_is_valid(tmp_path):
    result = _puzzle("validate", str(_job(tmp_path, search={"budgets": {"latency": "0.5x"}})), "--budget", "params=0.6x",
                     "--sweep", "latency=0.3x:1x:4")
    assert result.returncode == 0, result.stderr
    assert "valid job config" in result.stdout


def test_a_bad_budget_a_damaged_parent_file_and_an_empty_data_file_are_reported_in_one_run(tmp_path):
    import shutil

    parent = tmp_path / "parent"
    shutil.copytree(ROOT / "examples/parent", parent)
    weights = parent / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (tmp_path / "empty.txt").write_text("")
    raw = {"parent": {"path": str(parent)}, "data": {"files": [str(tmp_path / "empty.txt")]},
           "run": {"dir": str(tmp_path / "run")}, "search": {"budgets": {"latency": "fast"}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = _puzzle("validate", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].endswith("3 problem(s)")
    assert any("budget 'latency=fast'" in line for line in lines)
    assert any(f"{weights} is damaged, not a readable safetensors file" in line for line in lines)
    assert any("data: the documents contain no text" in line for line in lines)
    assert not (tmp_path / "run").exists()
