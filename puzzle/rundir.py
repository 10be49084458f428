"""The run directory: one folder per stage, a manifest per stage, a lock per stage.

    RUN_DIR/
      config.yaml              the resolved config of the latest command (all defaults filled in)
      <stage>/                 parent, library, scores, profile, search, child, kd, eval, report
      jobs/<name>/<stage>/     search, child, kd, eval, report of a named job (run.job); the jobs of
                               one run share its parent, library, scores and profile
        manifest.json          status (running | done | failed), timestamps, versions, config
                               fingerprint of the sections the stage depends on, outputs
        .lock, .lock.holder    held (filelock) while a process writes the stage, and that process's pid
        ...                    the stage's own files, each written atomically

A stage is reused only if its manifest says `done` with the same fingerprint (the stage table and its
runner are in `puzzle.pipeline`). The lock is an OS advisory lock, released by the kernel when its
process dies, so a killed run never leaves a stale lock; a manifest left `running` by a killed process
is simply redone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from puzzle.io import atomic_write_json, atomic_write_text
from puzzle.config import PuzzleConfig, dump_config
from puzzle.errors import PuzzleError


class Stage(str, enum.Enum):
    parent = "parent"
    library = "library"
    scores = "scores"
    profile = "profile"
    search = "search"
    child = "child"
    kd = "kd"
    eval = "eval"
    report = "report"
    fuse = "fuse"


# The stages a job owns; the others are shared by every job of a run directory.
JOB_STAGES = frozenset({Stage.search, Stage.child, Stage.kd, Stage.eval, Stage.report, Stage.fuse})


class Status(str, enum.Enum):
    running = "running"
    done = "done"
    failed = "failed"
    interrupted = "interrupted"  # was running when its process died (a kill, a lost machine)


def versions() -> dict[str, str]:
    import torch
    import transformers

    import puzzle

    return {
        "puzzle": puzzle.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def fingerprint(config: PuzzleConfig, keys: tuple[str, ...]) -> str:
    """Hash of the config sections (or dotted keys, e.g. 'run.seed') a stage depends on.

    Changing any of them invalidates the stage; the run directory itself is never part of it, so a
    copied run stays valid.
    """
    dumped = config.model_dump(mode="json")

    def pick(key: str):
        node = dumped
        for part in key.split("."):
            node = node[part]
        return node

    payload = json.dumps({k: pick(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class StageRecord:
    """What a running stage reports; written into its manifest when the stage ends."""

    outputs: dict[str, Any] = field(default_factory=dict)


class RunDir:
    def __init__(self, path: str | os.PathLike, job: str | None = None):
        self.path = Path(path)
        self.job = job

    @classmethod
    def of(cls, config: PuzzleConfig) -> RunDir:
        return cls(config.run.dir, config.run.job)

    def stage_dir(self, stage: Stage) -> Path:
        if self.job is not None and stage in JOB_STAGES:
            return self.path / "jobs" / self.job / stage.value
        return self.path / stage.value

    def done_fingerprint(self, stage: Stage) -> str | None:
        """The fingerprint a finished stage was made with: downstream stages include it in their own."""
        m = self.manifest(stage)
        return m["fingerprint"] if m is not None and m["status"] == Status.done.value else None

    def manifest(self, stage: Stage) -> dict[str, Any] | None:
        file = self.stage_dir(stage) / "manifest.json"
        if not file.is_file():
            return None
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            # Manifests are written atomically, so this is outside damage, not a crash of ours.
            raise PuzzleError(f"{file}: not valid JSON ({e}); delete the stage folder to redo it") from None
        if not isinstance(data, dict) or not {"status", "fingerprint"} <= set(data):
            raise PuzzleError(f"{file}: damaged, not a stage manifest (no status or fingerprint); delete the stage "
                              "folder to redo it")
        return data

    def is_done(self, stage: Stage, config_fingerprint: str) -> bool:
        m = self.manifest(stage)
        return m is not None and m["status"] == Status.done.value and m["fingerprint"] == config_fingerprint

    def mark_interrupted(self) -> list[Stage]:
        """Manifests still saying `running` whose lock no process holds belong to a process that died: say so.
        Returns the stages so marked; each is redone when its command runs again."""
        marked = []
        for stage in Stage:
            m = self.manifest(stage)
            if m is None or m.get("status") != Status.running.value:
                continue
            try:
                with self.lock(stage):
                    atomic_write_json(self.stage_dir(stage) / "manifest.json",
                                      {**m, "status": Status.interrupted.value, "finished": _now()})
                    marked.append(stage)
            except PuzzleError:
                continue  # a live process holds it: it is running
        return marked

    def write_config(self, config: PuzzleConfig) -> None:
        folder = self.path if self.job is None else self.path / "jobs" / self.job
        atomic_write_text(folder / "config.yaml", dump_config(config))

    @contextlib.contextmanager
    def lock(self, stage: Stage, suffix: str | None = None) -> Iterator[None]:
        """Exclusive right to write `stage`; `suffix` gives each rank of a multi-process job its own lock."""
        directory = self.stage_dir(stage)
        directory.mkdir(parents=True, exist_ok=True)
        name = ".lock" if suffix is None else f".lock.{suffix}"
        lock, holder = FileLock(directory / name, timeout=0), directory / f"{name}.holder"
        try:
            lock.acquire()
        except Timeout:
            pid = holder.read_text().strip() if holder.is_file() else "unknown"
            raise PuzzleError(
                f"stage '{stage.value}' of {self.path} is being written by another process (pid {pid}); "
                "wait for it to finish or choose another run.dir"
            ) from None
        try:
            holder.write_text(str(os.getpid()))
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def stage(self, stage: Stage, config_fingerprint: str) -> Iterator[StageRecord]:
        """Lock the stage and keep its manifest truthful: running, then done or failed."""
        with self.lock(stage):
            previous = self.manifest(stage) or {}
            base = {
                "stage": stage.value,
                "fingerprint": config_fingerprint,
                "started": _now(),
                "versions": versions(),
                "runs": previous.get("runs", 0) + 1,
            }
            file = self.stage_dir(stage) / "manifest.json"
            atomic_write_json(file, {**base, "status": Status.running.value})
            record = StageRecord()
            try:
                yield record
            except BaseException as e:
                atomic_write_json(
                    file, {**base, "status": Status.failed.value, "finished": _now(), "error": f"{type(e).__name__}: {e}"}
                )
                raise
            atomic_write_json(
                file, {**base, "status": Status.done.value, "finished": _now(), "outputs": record.outputs}
            )
