"""The `puzzle` command line: a thin layer over the stage functions.

Every command takes a YAML config and `--set key.sub=value` overrides. A problem with the user's
input is printed as one line per problem on stderr with exit code 2, and nothing is written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from puzzle.config import (
    ParentTrainingConfig,
    PuzzleConfig,
    Section,
    apply_overrides,
    describe_fields,
    read_yaml,
    validate,
)
from puzzle.errors import ConfigError, PuzzleError
from puzzle.progress import console, out
from puzzle.rundir import RunDir, Stage

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


def _key_reference(model: type[Section]) -> str:
    lines = []
    for key, default, description in describe_fields(model):
        lines.append(f"  {key}" + (f" = {default}" if default else "") + (f" : {description}" if description else ""))
    # \b stops click from re-wrapping the paragraph that follows.
    return "\b\n" + "\n".join(lines)


def _is_training_config(raw: dict) -> bool:
    return "training" in raw or "model" in raw or "output" in raw


JobOption = Annotated[
    Optional[str],
    typer.Option("--job", help="In a file with several jobs, only this one (default: every job in turn).", show_default=False),
]


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


def load_job(path: Path, overrides: list[str] | None) -> PuzzleConfig:
    """For the stages the jobs of a file share (parent, library, scores, profile): the first job's config."""
    return load_jobs(path, overrides)[0]


@app.command("train-parent")
def train_parent_command(config: ConfigArg, set_: SetOption = None) -> None:
    """Train a tokenizer and a small Llama parent on text (the embedded default: examples/train_parent.yaml).

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
def validate_command(config: ConfigArg, set_: SetOption = None) -> None:
    """Check a config: every problem is listed with its key, the value given and what is expected.

    Job files are also checked against the disk: the parent's path and family, the data files.
    """
    from puzzle.stages import preflight

    raw = apply_overrides(read_yaml(config), set_ or [])
    if _is_training_config(raw):
        validate(raw, ParentTrainingConfig, str(config))
        out.print(f"{config}: valid parent-training config")
        return
    jobs = load_jobs(config, set_)
    problems = list(dict.fromkeys(p for job in jobs for p in preflight(job)))
    if problems:
        raise ConfigError(problems, str(config))
    names = [job.run.job for job in jobs if job.run.job]
    out.print(f"{config}: valid job config" + (f" with {len(names)} jobs: {', '.join(names)}" if names else ""))



@app.command()
def run(config: ConfigArg, set_: SetOption = None, job_name: JobOption = None) -> None:
    """Run the whole pipeline: parent, library (BLD), scores, profile, then per job search, realize, KD, eval
    and report.

    Every stage already done in run.dir is reused, and a killed run resumes where it stopped. A file with
    a `jobs:` mapping (e.g. three budgets) runs each job on the shared library, scores and profile.
    """
    import time

    from puzzle.distill_stage import distill_stage
    from puzzle.eval_stage import eval_stage
    from puzzle.kd_stage import kd_stage
    from puzzle.profile_stage import check_profile_section, profile_stage
    from puzzle.realize_stage import realize_stage
    from puzzle.report import report_stage
    from puzzle.score_stage import score_stage
    from puzzle.search_stage import search_stage
    from puzzle.stages import check_inputs, parent_stage

    jobs = load_jobs(config, set_, job_name)
    for j in jobs:
        check_inputs(j)
        check_profile_section(j.profile)
        if not j.search.budgets:
            raise ConfigError([f"search.budgets: {_job_label(j)}has none; `puzzle run` needs a budget, "
                               "e.g. search.budgets: {latency: 0.5x}"], str(config))
    shared = jobs[0]
    steps = [(None, "parent", lambda: _print_parent(parent_stage(shared))),
             (None, "library (BLD)", lambda: _print_library(distill_stage(shared))),
             (None, "scores", lambda: _print_scores(shared, score_stage(shared))),
             (None, "profile", lambda: _print_profile(profile_stage(shared)))]
    for j in jobs:
        label = _job_label(j)
        steps += [(j, f"{label}search", lambda j=j: _print_search(j, search_stage(j, []))),
                  (j, f"{label}realize", lambda j=j: _print_child(realize_stage(j))),
                  (j, f"{label}global KD", lambda j=j: _print_kd(kd_stage(j))),
                  (j, f"{label}eval", lambda j=j: _print_eval(eval_stage(j))),
                  (j, f"{label}report", lambda j=j: _print_report(report_stage(j)))]
    for j in jobs:
        RunDir.of(j).write_config(j)
    started = time.time()
    failed: dict[str, str] = {}
    for n, (owner, name, step) in enumerate(steps, 1):
        if owner is not None and owner.run.job in failed:
            continue
        console.rule(f"[bold]stage {n}/{len(steps)}: {name}[/bold] ({time.time() - started:.0f} s so far)")
        try:
            step()
        except PuzzleError as e:
            # One job's impossible budget must not cost the other jobs of the file their results.
            if owner is None or len(jobs) == 1:
                raise
            failed[owner.run.job] = str(e)
            console.print(f"[red]job {owner.run.job} stopped: {e}[/red]")
    for j in jobs:
        if j.run.job in failed:
            continue
        run = RunDir.of(j)
        out.print(f"{_job_label(j)}child: {run.stage_dir(Stage.kd) / 'checkpoint'}")
        out.print(f"{_job_label(j)}report: {run.stage_dir(Stage.report) / 'report.html'}")
    out.print(f"run directory: {shared.run.dir} ({time.time() - started:.0f} s)")
    if failed:
        raise PuzzleError("; ".join(f"job {name} stopped: {reason}" for name, reason in failed.items()))


def _job_label(job: PuzzleConfig) -> str:
    return f"job {job.run.job}: " if job.run.job else ""


def _print_parent(summary) -> None:
    table = Table(title=f"parent {summary.source} ({summary.model_type}, {summary.parameters:,} parameters)")
    for column in ("layer", "attention", "heads", "kv heads", "intermediate"):
        table.add_column(column, justify="right")
    for layer in summary.layers:
        table.add_row(
            str(layer.index), layer.attention_type, str(layer.num_attention_heads), str(layer.num_key_value_heads),
            str(layer.intermediate_size),
        )
    out.print(table)
    out.print(
        f"validation loss {summary.validation_loss:.4f}, perplexity {summary.validation_perplexity:.2f} "
        f"on {summary.validation_tokens:,} tokens"
    )


@app.command()
def distill(
    config: ConfigArg,
    set_: SetOption = None,
    num_processes: Annotated[
        int,
        typer.Option(
            "--num-processes",
            help="Train on N processes (torch.distributed; gloo on CPU, NCCL on GPU). Candidates are sharded; "
            "the library equals a one-process run. Under torchrun or `accelerate launch` leave it at 1.",
        ),
    ] = 1,
) -> None:
    """Build the replacement library and train it by blockwise local distillation (BLD).

    Resumable: finished candidates are kept, a killed run continues from its last checkpoint, and a
    damaged entry is retrained. Writes RUN_DIR/library/ (see docs/run-directory.md).
    """
    from puzzle.distill_stage import distill_stage
    from puzzle.stages import check_inputs

    job = load_job(config, set_)
    check_inputs(job)
    if _relaunched(num_processes, ["distill", str(config)], set_):
        return
    RunDir.of(job).write_config(job)
    summary = distill_stage(job)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_library(summary)


def _relaunched(num_processes: int, argv: list[str], set_: list[str] | None) -> bool:
    """Run this command again in `num_processes` processes (unless already inside a launcher); True if it did."""
    from puzzle.distributed import relaunch

    if num_processes <= 1 or "WORLD_SIZE" in os.environ:
        return False
    code = relaunch(num_processes, argv + [arg for s in (set_ or []) for arg in ("--set", s)])
    if code:
        raise PuzzleError(f"distributed `puzzle {argv[0]}` failed (exit code {code}); see the messages above")
    return True


def _print_library(summary) -> None:
    table = Table(title=f"library: {len(summary.rows)} trained candidates ({summary.trained_now} trained now)")
    for column in ("layer", "candidate", "init", "initial nMSE", "final nMSE"):
        table.add_column(column, justify="left" if column in ("candidate", "init") else "right")
    for row, following in zip(summary.rows, summary.rows[1:] + [None]):
        last_of_layer = following is not None and following.layer != row.layer
        table.add_row(
            str(row.layer), row.subblocks, row.init, f"{row.initial_nmse:.4g}", f"{row.final_nmse:.4g}",
            end_section=last_of_layer,
        )
    out.print(table)
    improved = sum(r.final_nmse < r.initial_nmse for r in summary.rows)
    kept = [r.key for r in summary.rows if r.kept_initialization]
    out.print(f"{improved}/{len(summary.rows)} candidates improved on their initialization; {summary.seconds:.0f} s")
    if kept:
        out.print(f"kept the initialization (training did not improve held-out nMSE): {', '.join(kept)}")
    out.print(f"library: {summary.directory}")


@app.command()
def score(config: ConfigArg, set_: SetOption = None) -> None:
    """Score every block candidate by replacing that one layer of the parent (replace-1-block).

    Metrics on held-out text: KL(parent ‖ child) (default for the search), LM loss, top-1/5/10
    agreement with the parent's greedy token. Writes RUN_DIR/scores/scores.csv; resumable per layer.
    """
    from puzzle.score_stage import score_stage
    from puzzle.stages import check_inputs

    job = load_job(config, set_)
    check_inputs(job)
    RunDir.of(job).write_config(job)
    _print_scores(job, score_stage(job))


def _print_scores(job: PuzzleConfig, summary) -> None:
    frame = summary.frame
    table = Table(title=f"best blocks per layer by {job.scoring.metric} ({len(frame)} blocks scored)")
    for column in ("layer", "attention", "ffn", "kl", "lm_loss", "top1"):
        table.add_column(column, justify="right")
    metric = job.scoring.metric
    ascending = not metric.startswith("top")
    for layer, group in frame.groupby("layer"):
        cheapest = group[(group.attention != group.attention.iloc[0]) | (group.ffn != group.ffn.iloc[0])]
        for _, row in cheapest.sort_values(metric, ascending=ascending).head(3).iterrows():
            table.add_row(str(layer), row.attention, row.ffn, f"{row.kl:.4f}", f"{row.lm_loss:.3f}", f"{row.top1:.3f}")
        table.rows[-1].end_section = True
    out.print(table)
    out.print(f"scores: {summary.table} ({summary.scored_now} scored now, {summary.seconds:.0f} s)")


@app.command()
def profile(
    config: ConfigArg,
    set_: SetOption = None,
    device: Annotated[
        Optional[str],
        typer.Option(help="'local' to measure here, or a GPU for the roofline: h100, h200, a100, l40s, b200, rtx4090. "
                     "Overrides profile.device."),
    ] = None,
    check: Annotated[
        int,
        typer.Option(help="Also time the parent and this many random children whole, at two scenarios, and print "
                     "the error of the additive cost model (local device only)."),
    ] = 0,
) -> None:
    """Cost of every subblock candidate: parameters, weight and KV-cache bytes, prefill and decode time.

    Measured on the local device (warm-up, repeats, median and spread), or analytic (roofline) for a named
    GPU. Embeddings, final norm and lm_head are their own row. Writes RUN_DIR/profile/profile.csv.
    """
    from puzzle.profile_stage import check_profile_section, profile_stage
    from puzzle.stages import check_inputs

    overrides = list(set_ or []) + ([f"profile.device={device}"] if device else [])
    job = load_job(config, overrides)
    check_inputs(job)
    check_profile_section(job.profile)
    RunDir.of(job).write_config(job)
    summary = profile_stage(job, check_models=check)
    _print_profile(summary)


def _print_profile(summary) -> None:
    rows = [r for r in summary.rows if r.layer <= 0]
    method = summary.rows[0].method
    table = Table(title=f"profile of layer 0 and fixed costs ({method}, {summary.device})")
    for column in ("subblock", "candidate", "params", "weight MiB", "KV MiB", "prefill ms", "decode ms/step", "spread"):
        table.add_column(column, justify="left" if column in ("subblock", "candidate") else "right")
    for r in rows:
        table.add_row(
            r.subblock, r.candidate, f"{r.params:,}", f"{r.weight_bytes / 2**20:.3f}", f"{r.kv_bytes / 2**20:.3f}",
            f"{r.prefill_seconds * 1e3:.3f}", f"{r.decode_seconds * 1e3:.4f}",
            f"{max(r.prefill_spread, r.decode_spread):.0%}",
        )
    out.print(table)
    if summary.checks:
        check_table = Table(title="additive cost model: predicted (sum of blocks + fixed) vs measured latency per batch")
        for column in ("model", "scenario", "predicted s", "measured s", "error"):
            check_table.add_column(column, justify="right")
        for c in summary.checks:
            check_table.add_row(c.model, c.scenario, f"{c.predicted_seconds:.4f}", f"{c.measured_seconds:.4f}",
                                f"{c.error:+.1%}")
        out.print(check_table)
    out.print(f"profile: {summary.table} ({summary.seconds:.1f} s)")


@app.command()
def search(
    config: ConfigArg,
    set_: SetOption = None,
    budget: Annotated[
        Optional[list[str]],
        typer.Option(
            help="A budget, repeatable: latency=0.5x, throughput=2x or 1200tok/s, memory=40GiB, params=2.5M, kv=1MiB; "
            "for MoE parents also experts=24 (experts kept over all layers) and active_params=0.5x. "
            "'x' is a ratio of the parent; adds to search.budgets.",
            show_default=False,
        ),
    ] = None,
    solutions: Annotated[Optional[int], typer.Option(help="Number of diverse solutions (search.solutions).")] = None,
    min_diff: Annotated[
        Optional[int], typer.Option(help="Layers in which each solution differs from every earlier one (search.min_diff).")
    ] = None,
    sweep: Annotated[
        Optional[str],
        typer.Option(help="Frontier instead of one search: KIND=LOW:HIGH:STEPS, e.g. latency=0.3x:1.0x:8 (other budgets "
                     "held). Writes search/frontier.csv and frontier.png."),
    ] = None,
    job_name: JobOption = None,
) -> None:
    """Choose one block per layer: the best total score within the budgets (MIP, PuLP/CBC).

    Reads RUN_DIR/scores and RUN_DIR/profile; writes RUN_DIR/search/solutions.json. The paper's greedy
    search runs on the same inputs and is printed beside the MIP's result.
    """
    for job in load_jobs(config, set_, job_name):
        _search_job(job, budget, solutions, min_diff, sweep)


def _search_job(job: PuzzleConfig, budget, solutions, min_diff, sweep) -> None:
    from puzzle.search_stage import frontier, search_stage

    if sweep is not None:
        points, table_file, plot_file = frontier(job, sweep, budget or [])
        table = Table(title=f"frontier {sweep} ({job.search.metric}, lower is better)")
        for column in ("budget", "limit", "MIP objective", "used", "greedy objective"):
            table.add_column(column, justify="right")
        for p in points:
            fmt = lambda v: "infeasible" if v is None else f"{v:.6g}"  # noqa: E731
            table.add_row(p.budget, f"{p.limit:.6g}", fmt(p.objective), fmt(p.used), fmt(p.greedy_objective))
        out.print(table)
        out.print(f"frontier: {table_file}, plot: {plot_file}")
        return
    _print_search(job, search_stage(job, budget or [], solutions, min_diff))


@app.command()
def baseline(
    method: Annotated[str, typer.Argument(help="greedy, shortgpt, llm-drop, uniform-ffn or random (search.method).",
                                          show_default=False)],
    config: ConfigArg,
    set_: SetOption = None,
    budget: Annotated[
        Optional[list[str]],
        typer.Option(help="A budget, repeatable, as for `puzzle search` (latency=0.5x, params=2.5M, …).",
                     show_default=False),
    ] = None,
) -> None:
    """A simpler architecture choice than the MIP on the same scores, profile and budgets: `puzzle search`
    with search.method=METHOD.

    Writes RUN_DIR/search/solutions.json as the search does, so `puzzle realize` builds the baseline's child.
    shortgpt and llm-drop rank layers by the parent's Block Influence on the held-out blocks.
    """
    from puzzle.search_stage import search_stage

    job = load_job(config, [*(set_ or []), f"search.method={method}"])
    _print_search(job, search_stage(job, budget or []))


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
    from puzzle.realize_stage import realize_stage

    for job in load_jobs(config, set_, job_name):
        _print_child(realize_stage(job, solution))


@app.command()
def kd(
    config: ConfigArg,
    set_: SetOption = None,
    job_name: JobOption = None,
    num_processes: Annotated[
        int,
        typer.Option("--num-processes", help="Train on N processes (torch.distributed; each takes an equal share of "
                     "every batch). Under torchrun or `accelerate launch` leave it at 1."),
    ] = 1,
) -> None:
    """Global knowledge distillation of the realized child against the parent.

    Loss: kd.kl_weight · KL(parent ‖ child) + kd.cosine_weight · Σ layers (1 − cos) of hidden states
    (+ kd.lm_weight · LM loss). Writes RUN_DIR/kd/checkpoint in the child's format; resumable after a kill.
    """
    from puzzle.kd_stage import kd_stage
    from puzzle.stages import check_inputs

    jobs = load_jobs(config, set_, job_name)
    for j in jobs:
        check_inputs(j)
    if _relaunched(num_processes, ["kd", str(config)] + (["--job", job_name] if job_name else []), set_):
        return
    for j in jobs:
        summary = kd_stage(j)
        if int(os.environ.get("RANK", "0")) == 0:
            _print_kd(summary, _job_label(j))


def _print_kd(summary, label: str = "") -> None:
    table = Table(title=f"{label}global KD: {summary.steps} steps, {summary.tokens:,} tokens (held-out losses)")
    for column in ("loss", "before", "after"):
        table.add_column(column, justify="right")
    for k in ("kl", "cosine", "lm", "total"):
        table.add_row(k, f"{summary.before[k]:.4f}", f"{summary.after[k]:.4f}")
    out.print(table)
    out.print(f"distilled child: {summary.directory} ({summary.seconds:.0f} s)")


@app.command("eval")
def eval_command(
    config: ConfigArg,
    set_: SetOption = None,
    job_name: JobOption = None,
    kv_dtype: Annotated[Optional[str], typer.Option(help="'fp8' also runs every model with a simulated FP8 KV cache "
                                                    "and reports the KL it adds (eval.kv_dtype).", show_default=False)] = None,
) -> None:
    """Parent, child and distilled child side by side: KL to the parent, perplexity, top-1 agreement, size,
    and prefill/decode speed measured here next to the cost model's prediction.

    lm-evaluation-harness tasks (eval.tasks) run on every model when it is installed. Writes
    RUN_DIR/eval/results.json and results.csv.
    """
    from puzzle.eval_stage import eval_stage
    from puzzle.stages import check_inputs

    overrides = list(set_ or []) + ([f"eval.kv_dtype={kv_dtype}"] if kv_dtype is not None else [])
    for j in load_jobs(config, overrides, job_name):
        check_inputs(j)
        _print_eval(eval_stage(j), _job_label(j))


def _print_eval(summary, label: str = "") -> None:
    s = summary.scenario
    table = Table(title=f"{label}evaluation: {summary.validation_tokens:,} held-out tokens; speed on {summary.device} at "
                        f"batch {s.batch_size}, prefill {s.prefill_length}, decode {s.decode_length}")
    fp8 = any(m.kv_fp8_added_kl is not None for m in summary.models)
    for column in ("model", "params", "KL", "perplexity", "top-1", "prefill tok/s", "decode tok/s",
                   "speedup measured", "speedup predicted", *(["KL added by FP8 KV"] if fp8 else [])):
        table.add_column(column, justify="left" if column == "model" else "right")
    for m in summary.models:
        predicted = summary.speedup(m.name, "predicted")
        table.add_row(
            m.name, f"{m.parameters:,}", f"{m.kl:.4f}", f"{m.perplexity:.2f}", f"{m.top1:.1%}",
            f"{m.prefill_tokens_per_second:,.0f}", f"{m.decode_tokens_per_second:,.0f}",
            f"{summary.speedup(m.name, 'measured'):.2f}x", "n/a" if predicted is None else f"{predicted:.2f}x",
            *([f"{m.kv_fp8_added_kl:+.5f}"] if fp8 else []),
        )
    out.print(table)
    for m in summary.models:
        for task, metrics in m.tasks.items():
            out.print(f"{m.name} {task}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    out.print(f"results: {summary.file} ({summary.seconds:.0f} s)")


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
    from puzzle.fuse_stage import fuse_stage

    if config.is_dir():
        if child is not None:
            raise PuzzleError(f"give the child once: as the argument ({config}) or as --child ({child})")
        config, child = _run_config_of(config), config
    jobs = load_jobs(config, set_, job_name)
    if len(jobs) > 1 and (child is not None or output is not None):
        raise PuzzleError(f"--child and --output name one child; pick its job with --job (this file has {len(jobs)})")
    for j in jobs:
        _print_fusion(fuse_stage(j, child=child, output=output, include_last=include_last, max_distance=max_distance),
                      _job_label(j))


def _print_fusion(summary, label: str = "") -> None:
    if not summary.runs:
        out.print(f"{label}nothing to fuse: {summary.source} has no run of 2 or more consecutive layers without "
                  "attention and with a dense FFN")
        return
    table = Table(title=f"{label}FFN dependencies ({summary.validation_tokens:,} held-out tokens; cosine distance, "
                        "0 = independent)")
    for column in ("run", "FFN pair", "distance"):
        table.add_column(column, justify="right")
    for first, last in summary.runs:
        for d in (d for d in summary.dependencies if first <= d.first <= last):
            table.add_row(f"{first}-{last}", f"{d.first} → {d.second}", f"{d.distance:.4f}")
    out.print(table)
    if not summary.fused:
        out.print(f"{label}nothing to fuse: every run is shorter than 2 FFNs after leaving out its last "
                  "(--include-last fuses it) or cutting at --max-distance")
        return
    out.print(f"fused layers: {', '.join(f'{a}-{b}' for a, b in summary.fused)}")
    table = Table(title=f"{label}before and after fusion")
    for column in ("model", "params", "KL to parent", "KL to unfused", "prefill tok/s", "decode tok/s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, m in (("unfused", summary.before), ("fused", summary.after)):
        table.add_row(name, f"{m.parameters:,}", f"{m.kl_to_parent:.4f}", f"{m.kl_to_unfused:.5f}",
                      f"{m.prefill_tokens_per_second:,.0f}", f"{m.decode_tokens_per_second:,.0f}")
    out.print(table)
    out.print(f"fused child: {summary.directory} ({summary.seconds:.0f} s)")


@app.command()
def report(config: ConfigArg, set_: SetOption = None, job_name: JobOption = None) -> None:
    """Write the run's report: RUN_DIR/report/report.html (self-contained) and report.md with its plots.

    The child's architecture per layer, the quality/cost frontier with the child marked, the KD curve,
    and the parent-vs-child table (quality, parameters, memory, predicted and measured speed).
    """
    from puzzle.report import report_stage

    for j in load_jobs(config, set_, job_name):
        _print_report(report_stage(j))


def _print_report(summary) -> None:
    out.print(f"report: {summary.html} (markdown: {summary.markdown}; {len(summary.plots)} plots)")


def _print_child(summary) -> None:
    table = Table(title=f"child: {summary.parameters:,} parameters ({summary.parameters / summary.parent_parameters:.2f}x the parent)")
    for column in ("layer", "attention", "ffn"):
        table.add_column(column)
    for i, c in enumerate(summary.choices):
        table.add_row(str(i), c.attention.id, c.ffn.id + (" (coupled)" if c.coupled else ""))
    out.print(table)
    for verdict in summary.engines:
        out.print(f"{verdict.engine}: {'can serve it' if verdict.servable else 'cannot serve it'}")
        for reason in verdict.reasons:
            out.print(f"  - {reason}")
    out.print(f"child checkpoint: {summary.directory} ({summary.seconds:.1f} s)")


def _print_search(job, outcome) -> None:
    for note in outcome.notes:
        out.print(note)
    problem = outcome.problem
    method = "MIP" if job.search.method == "mip" else job.search.method
    for n, sol in enumerate(outcome.solutions):
        table = Table(title=f"solution {n} by {method}: objective {sol.objective:.4f} ({job.search.metric}, sum over layers)")
        table.add_column("layer", justify="right")
        table.add_column("block")
        table.add_column("score", justify="right")
        for i, c in enumerate(sol.choice):
            block = problem.layers[i][c]
            table.add_row(str(i), block.name, f"{block.score:.4f}")
        out.print(table)
        for k, u in sol.usage.items():
            parent = problem.parent_totals[k]
            out.print(f"  {k}: {u.used:.6g} of {u.limit:.6g} ({u.used / parent:.2f}x the parent)")
    g = outcome.greedy
    if g is None:
        out.print("greedy search: found no architecture within the budgets")
    else:
        best = outcome.solutions[0].objective
        verdict = "equal"
        if abs(best - g.objective) > 1e-12:
            verdict = f"{method} better" if best < g.objective else "greedy better"
        out.print(f"greedy search: objective {g.objective:.4f} vs {method} {best:.4f} ({verdict})")
    out.print(f"solutions: {outcome.file} ({method} solve {outcome.solve_seconds:.2f} s, search {outcome.seconds:.1f} s)")



def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # The stages draw their own progress bars; transformers' per-file loading bars would interleave.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        app()
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
        raise
