"""The pipeline as data (docs/design.md §11): one table of stages and one runner for all of them.

Each row of `STAGES` says what a stage depends on (the config sections in its fingerprint and the
upstream stages whose fingerprints enter its key), what it needs to exist first, what it writes, and
which module does the work. `run_stage` gives every stage the same protocol: compute the key, reuse the
stage when its manifest says `done` under that key and its outputs exist, otherwise take its lock, mark
it running, run it, and record done (or failed) with its outputs. `puzzle run`, the single-stage
commands and the benchmarks all take the order from this table.

A stage module (`puzzle.stages.<name>`) defines `run(ctx, **options)`, which does the work and returns
the stage's summary, and `read(ctx)`, which rebuilds that summary from the stage's outputs. It may define
`key_extra(config, run)` for what identifies its input beyond fingerprints (a chosen solution's blocks, a
child checkpoint named by path). Modules are imported when their stage runs, so that commands that only
check a config never import torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzle.config import PuzzleConfig
from puzzle.errors import PuzzleError
from puzzle.rundir import RunDir, Stage, StageRecord, fingerprint


@dataclass(frozen=True)
class Needs:
    """An output of an earlier stage that must exist before a stage can run."""

    stage: Stage
    output: str
    name: str | None = None  # what the message calls it ("no library in …"); else it names the file

    def problem(self, run: RunDir) -> str | None:
        path = run.stage_dir(self.stage) / self.output
        if path.exists():
            return None
        missing = f"no {self.name} in {path.parent}" if self.name else f"{path} does not exist"
        return f"{missing}; run `puzzle {SPECS[self.stage].command}` first"


@dataclass(frozen=True)
class StageSpec:
    stage: Stage
    title: str  # as `puzzle run` announces it
    command: str  # the command that makes it, for "run `puzzle …` first"
    sections: tuple[str, ...]  # config sections (or dotted keys) in its fingerprint
    upstream: tuple[Stage, ...] = ()  # their fingerprints enter its key: a change there redoes this stage
    requires: tuple[Needs, ...] = ()
    outputs: tuple[str, ...] = ()  # in its folder; all must exist for a done stage to be reused
    distributed: bool = False  # runs on every rank of a torch.distributed job; rank 0 keeps the manifest
    reuse: bool = True  # False: the stage checks its own finished parts each time (library entries)
    version: int = 1  # bumped when the stage's outputs change format, so older ones are redone

    @property
    def module(self) -> str:
        return f"puzzle.stages.{self.stage.value}"


STAGES: tuple[StageSpec, ...] = (
    StageSpec(Stage.parent, "parent", "run", ("parent", "data", "eval"), outputs=("summary.json",), distributed=True),
    StageSpec(Stage.library, "library (BLD)", "distill", ("run.seed", "parent", "data", "library", "bld", "target"),
              outputs=("space.json", "table.csv"), distributed=True, reuse=False),
    StageSpec(Stage.scores, "scores", "score", ("parent", "data", "scoring"), upstream=(Stage.library,),
              requires=(Needs(Stage.library, "space.json", "library"),), outputs=("scores.csv",), distributed=True,
              version=2),
    StageSpec(Stage.profile, "profile", "profile", ("parent", "profile"), upstream=(Stage.library,),
              requires=(Needs(Stage.library, "space.json", "library"),), outputs=("profile.csv",), version=3),
    StageSpec(Stage.search, "search", "search", ("search", "run.seed", "target"), upstream=(Stage.scores, Stage.profile),
              requires=(Needs(Stage.scores, "scores.csv"), Needs(Stage.profile, "profile.csv")), outputs=("solutions.json",),
              version=2),
    StageSpec(Stage.child, "realize", "realize", ("parent", "realize"), upstream=(Stage.library,),
              requires=(Needs(Stage.search, "solutions.json"),), outputs=("checkpoint/config.json",), version=2),
    StageSpec(Stage.kd, "global KD", "kd", ("kd", "data", "parent", "run.seed"),
              outputs=("checkpoint/config.json", "summary.json"), distributed=True, version=2),
    StageSpec(Stage.eval, "eval", "eval", ("eval", "data", "parent", "profile"),
              upstream=(Stage.profile, Stage.child, Stage.kd), requires=(Needs(Stage.child, "checkpoint"),),
              outputs=("results.json",), version=2, distributed=True),
    StageSpec(Stage.report, "report", "report", ("search",), upstream=(Stage.search, Stage.child, Stage.kd, Stage.eval),
              requires=(Needs(Stage.search, "solutions.json"), Needs(Stage.child, "checkpoint/puzzle_child.json"),
                        Needs(Stage.eval, "results.json")),
              outputs=("report.html", "report.md")),
    StageSpec(Stage.fuse, "fuse", "fuse", ("eval", "profile", "data", "parent"), reuse=False),
)

SPECS: dict[Stage, StageSpec] = {spec.stage: spec for spec in STAGES}
# What `puzzle run` does: the shared stages once, then each job's; fuse only runs when asked for.
RUN_ORDER: tuple[Stage, ...] = tuple(s.stage for s in STAGES if s.stage is not Stage.fuse)


@dataclass
class StageContext:
    """What a stage function gets: its config, its run directory and folder, and its key."""

    config: PuzzleConfig
    run: RunDir
    stage: Stage
    key: str
    record: StageRecord = field(default_factory=StageRecord)  # outputs for the manifest

    @property
    def directory(self) -> Path:
        return self.run.stage_dir(self.stage)


def _module(spec: StageSpec):
    return importlib.import_module(spec.module)


def requirement_problems(spec: StageSpec, run: RunDir) -> list[str]:
    """The outputs of earlier stages that `spec`'s stage needs and that do not exist yet."""
    return [p for p in (needs.problem(run) for needs in spec.requires) if p is not None]


def check_requirements(spec: StageSpec, run: RunDir) -> None:
    problems = requirement_problems(spec, run)
    if problems:
        raise PuzzleError(problems[0])


def stage_key(spec: StageSpec, config: PuzzleConfig, run: RunDir, **options: Any) -> str:
    """Fingerprint of the stage's sections, its upstream stages' fingerprints, its input and its format."""
    parts = [fingerprint(config, spec.sections)]
    parts += [str(run.done_fingerprint(stage)) for stage in spec.upstream]
    key_extra = getattr(_module(spec), "key_extra", None)
    if key_extra is not None:
        parts.append(key_extra(config, run, **options))
    return "-".join(parts) + f"-v{spec.version}"


def run_stage(stage: Stage, config: PuzzleConfig, **options: Any):
    """Run one stage under the common protocol and return its summary (read back when it is reused).

    `options` are the command-line choices of a stage that are not config (fuse's --child and --output);
    they enter the key through the stage's `key_extra`.
    """
    spec = SPECS[stage]
    module = _module(spec)
    run = RunDir.of(config)
    check_requirements(spec, run)
    ctx = StageContext(config, run, stage, stage_key(spec, config, run, **options))
    from puzzle.distributed import workers

    team = workers()
    done = spec.reuse and run.is_done(stage, ctx.key) and all((ctx.directory / o).exists() for o in spec.outputs)
    # Rank 0's view decides: a rank that looks later may find the stage rank 0 has just finished, skip it and
    # leave rank 0 waiting in the stage's collectives while it runs the next stage's.
    if team.gather(done)[0]:
        return module.read(ctx, **options)
    if not spec.distributed:
        # A one-process stage in a multi-process command: rank 0 runs it, the others wait and read its result.
        summary, problem = None, None
        if team.is_main:
            try:
                with run.stage(stage, ctx.key) as record:
                    ctx.record = record
                    summary = module.run(ctx, **options)
            except PuzzleError as e:
                if team.world == 1:
                    raise
                problem = e
        # Every rank learns how rank 0 fared, so that a refused stage (an infeasible search) stops all alike.
        failure = team.gather(None if problem is None else str(problem))[0]
        if failure is not None:
            raise problem if team.is_main else PuzzleError(failure)
        return summary if team.is_main else module.read(ctx, **options)
    # Rank 0 keeps the manifest; the other ranks work under locks of their own.
    with run.stage(stage, ctx.key) if team.is_main else run.lock(stage, suffix=f"rank{team.rank}") as record:
        ctx.record = record if team.is_main else StageRecord()
        summary = module.run(ctx, team=team, **options)
    team.barrier()
    return summary if summary is not None else module.read(ctx, **options)
