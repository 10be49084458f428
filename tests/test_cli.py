"""The CLI's contract: bad input gets one clear line per problem, exit code 2, no traceback, nothing written."""

import json
import subprocess
import sys

import pytest
import yaml

from tests.helpers import assert_clean_failure, cli, pipeline_job


def test_help_lists_the_commands(monkeypatch, capsys):
    code, (out, _) = cli(monkeypatch, capsys, "--help")
    assert code == 0
    for command in ("train-parent", "validate", "run"):
        assert command in out


def test_malformed_yaml(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("parent: {path: [x\n")
    code, (_, err) = cli(monkeypatch, capsys, "run", bad)
    assert_clean_failure(code, err, tmp_path, "malformed YAML at line")


def test_unknown_key(monkeypatch, capsys, tmp_path, tiny_parent_dir):
    code, (_, err) = cli(monkeypatch, capsys, "run", pipeline_job(tmp_path, tiny_parent_dir, kd={"tokenz": 5}))
    assert_clean_failure(code, err, tmp_path, "kd.tokenz: unknown key; did you mean 'tokens'? allowed keys here: ")


def test_wrong_type(monkeypatch, capsys, tmp_path, tiny_parent_dir):
    path = pipeline_job(tmp_path, tiny_parent_dir)
    code, (_, err) = cli(monkeypatch, capsys, "run", path, "--set", "eval.batch_size=many")
    assert_clean_failure(code, err, tmp_path, "eval.batch_size: got 'many'; Input should be a valid integer")


def test_missing_parent_path(monkeypatch, capsys, tmp_path):
    code, (_, err) = cli(monkeypatch, capsys, "run", pipeline_job(tmp_path, tmp_path / "nowhere"))
    assert_clean_failure(code, err, tmp_path, "does not exist or is not a directory")


def test_unsupported_model_type(monkeypatch, capsys, tmp_path):
    fake = tmp_path / "gpt2"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, (_, err) = cli(monkeypatch, capsys, "run", pipeline_job(tmp_path, fake))
    assert_clean_failure(code, err, tmp_path, "'gpt2' is not supported; supported: gpt_oss, llama, mistral, mixtral, nemotron_h, qwen2, qwen3, qwen3_moe")


def test_missing_data_path(monkeypatch, capsys, tmp_path, tiny_parent_dir):
    path = pipeline_job(tmp_path, tiny_parent_dir, data={"files": [str(tmp_path / "missing/*.txt")]})
    code, (_, err) = cli(monkeypatch, capsys, "run", path)
    assert_clean_failure(code, err, tmp_path, "data.files: no file matches")


def test_unreadable_data_file(monkeypatch, capsys, tmp_path, tiny_parent_dir):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    path = pipeline_job(tmp_path, tiny_parent_dir, data={"files": [str(binary)]})
    code, (_, err) = cli(monkeypatch, capsys, "run", path)
    assert_clean_failure(code, err, tmp_path, "is not UTF-8 text")


def test_validate_reports_config_and_disk_problems_together(monkeypatch, capsys, tmp_path):
    path = pipeline_job(tmp_path, tmp_path / "nowhere", data={"files": [str(tmp_path / "none.txt")]})
    code, (_, err) = cli(monkeypatch, capsys, "validate", path)
    assert code == 2
    assert "2 problem(s)" in err and "parent.path" in err and "data.files" in err


def test_validate_accepts_a_good_config(monkeypatch, capsys, tmp_path, tiny_parent_dir):
    code, (out, _) = cli(monkeypatch, capsys, "validate", pipeline_job(tmp_path, tiny_parent_dir))
    assert code == 0 and "valid job config" in out


@pytest.mark.slow
def test_run_writes_the_parent_stage_and_reuses_it(monkeypatch, capsys, tmp_path, tiny_parent_dir):
    path = pipeline_job(tmp_path, tiny_parent_dir)
    code, (_, err) = cli(monkeypatch, capsys, "run", path)
    assert code == 0, err
    run = tmp_path / "run"
    manifest = json.loads((run / "parent/manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["runs"] == 1
    assert set(manifest["versions"]) >= {"puzzle", "torch", "transformers"}
    for stage in ("library", "scores", "profile", "search", "child", "kd", "eval"):
        assert json.loads((run / stage / "manifest.json").read_text())["status"] == "done"
    summary = json.loads((run / "parent/summary.json").read_text())
    assert summary["model_type"] == "llama" and len(summary["layers"]) == 2
    assert yaml.safe_load((run / "config.yaml").read_text())["eval"]["validation_blocks"] == 4
    # A second run reuses the finished stages instead of redoing them: a measured profile is not measured
    # again (that would move the search with the machine's load), so nothing after it is redone either.
    profile = (run / "profile/profile.csv").read_text()
    code, (_, _) = cli(monkeypatch, capsys, "run", path)
    assert code == 0
    for stage in ("parent", "profile", "child", "kd", "eval"):
        assert json.loads((run / stage / "manifest.json").read_text())["runs"] == 1, stage
    assert (run / "profile/profile.csv").read_text() == profile


@pytest.mark.slow
def test_subprocess_entry_point_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("parent: [\n")
    result = subprocess.run([sys.executable, "-m", "puzzle", "validate", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["library.kv_heads=[3]"], "library.kv_heads: 3 does not divide the parent's 2 KV heads"),
        (["library.ffn_fractions=[1.5]"], "library.ffn_fractions.0: got 1.5; Input should be less than or equal to 1"),
        (["library.windows=[0]"], "library.windows.0: got 0; Input should be greater than 0"),
        (
            ["library.kv_heads=[2]", "library.windows=[]", "library.linear_attention=false",
             "library.noop_attention=false", "library.ffn_fractions=[]", "library.linear_ffn=false",
             "library.noop_ffn=false"],
            "candidate list is empty",
        ),
    ],
)
def test_distill_bad_library_options(monkeypatch, capsys, tmp_path, tiny_parent_dir, overrides, message):
    args = [arg for o in overrides for arg in ("--set", o)]
    code, (_, err) = cli(monkeypatch, capsys, "distill", pipeline_job(tmp_path, tiny_parent_dir), *args)
    assert_clean_failure(code, err, tmp_path, message)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "tpu"], "unknown device 'tpu'; known: local, h100"),
        (["--set", "profile.prefill_length=0"], "profile.prefill_length: got 0; Input should be greater than or equal to 1"),
    ],
)
def test_profile_bad_input(monkeypatch, capsys, tmp_path, tiny_parent_dir, args, message):
    code, (_, err) = cli(monkeypatch, capsys, "profile", pipeline_job(tmp_path, tiny_parent_dir), *args)
    assert_clean_failure(code, err, tmp_path, message)


@pytest.mark.parametrize("command", ["profile", "score"])
def test_stages_without_a_library(monkeypatch, capsys, tmp_path, tiny_parent_dir, command):
    code, (_, err) = cli(monkeypatch, capsys, command, pipeline_job(tmp_path, tiny_parent_dir))
    assert code == 2 and "no library" in err and "puzzle distill" in err and "Traceback" not in err
