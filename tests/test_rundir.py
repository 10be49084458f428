import pytest

from puzzle.config import validate
from puzzle.errors import PuzzleError
from puzzle.io import atomic_dir, atomic_write_json, atomic_write_text
from puzzle.rundir import RunDir, Stage, fingerprint

CONFIG = validate({"parent": {"path": "p"}, "data": {"files": ["x.txt"]}})


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_text(tmp_path / "a.json", "replaced")
    assert (tmp_path / "a.json").read_text() == "replaced"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_dir_keeps_the_old_directory_when_the_writer_fails(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_stage_manifest_records_done_and_failed(tmp_path):
    run = RunDir(tmp_path)
    key = fingerprint(CONFIG, ("parent",))
    with run.stage(Stage.parent, key) as record:
        record.outputs = {"n": 3}
    m = run.manifest(Stage.parent)
    assert m["status"] == "done" and m["outputs"] == {"n": 3} and run.is_done(Stage.parent, key)
    assert not run.is_done(Stage.parent, "another-config")
    with pytest.raises(ValueError):
        with run.stage(Stage.parent, key):
            raise ValueError("boom")
    m = run.manifest(Stage.parent)
    assert m["status"] == "failed" and "boom" in m["error"] and m["runs"] == 2
    assert not run.is_done(Stage.parent, key)


def test_second_writer_of_a_stage_is_refused(tmp_path):
    run = RunDir(tmp_path)
    with run.lock(Stage.library):
        with pytest.raises(PuzzleError, match=r"being written by another process \(pid \d+\)"):
            with run.lock(Stage.library):
                pass
    with run.lock(Stage.library):  # released after the first holder is done
        pass


def test_fingerprint_depends_only_on_the_named_sections():
    other_kd = validate({"parent": {"path": "p"}, "data": {"files": ["x.txt"]}, "kd": {"tokens": 7}})
    assert fingerprint(CONFIG, ("parent", "data")) == fingerprint(other_kd, ("parent", "data"))
    assert fingerprint(CONFIG, ("kd",)) != fingerprint(other_kd, ("kd",))


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "parent").mkdir()
    (tmp_path / "parent/manifest.json").write_text("{not json")
    with pytest.raises(PuzzleError, match="not valid JSON"):
        run.manifest(Stage.parent)
