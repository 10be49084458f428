"""How the CLI shows each stage's summary: rich tables on stdout (progress goes to stderr)."""

from __future__ import annotations

from rich.table import Table

from puzzle.config import PuzzleConfig
from puzzle.progress import out



def parent(summary) -> None:
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



def library(summary) -> None:
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



def scores(job: PuzzleConfig, summary) -> None:
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



def profile(summary) -> None:
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
    if summary.fit is not None:
        out.print(summary.fit.describe())
        out.print("roofline assumptions: the datasheet's dense peak FLOP/s and memory bandwidth, reached by every "
                  "kernel; no kernel-launch, communication or framework overhead")
    out.print(f"profile: {summary.table} ({summary.seconds:.1f} s)")



def kd(summary, label: str = "") -> None:
    table = Table(title=f"{label}global KD: {summary.steps} steps, {summary.tokens:,} tokens (held-out losses)")
    for column in ("loss", "before", "after"):
        table.add_column(column, justify="right")
    for k in ("kl", "cosine", "lm", "total"):
        table.add_row(k, f"{summary.before[k]:.4f}", f"{summary.after[k]:.4f}")
    out.print(table)
    out.print(f"distilled child: {summary.directory} ({summary.seconds:.0f} s)")



def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def evaluation(summary, label: str = "") -> None:
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
            _rate(m.prefill_tokens_per_second), _rate(m.decode_tokens_per_second),
            _ratio(summary.speedup(m.name, "measured")), _ratio(predicted),
            *([f"{m.kv_fp8_added_kl:+.5f}"] if fp8 else []),
        )
    out.print(table)
    for m in summary.models:
        for task, metrics in m.tasks.items():
            out.print(f"{m.name} {task}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    out.print(f"results: {summary.file} ({summary.seconds:.0f} s)")



def engine(summary, label: str = "") -> None:
    """Each model in llama.cpp: its logits against transformers', and its speed against the parent's there."""
    table = Table(title=f"{label}llama.cpp: {summary.tokens} held-out tokens, logits checked against transformers")
    for column in ("model", "logits rel. error", "argmax agreement", "prefill tok/s", "decode tok/s",
                   "prefill speedup", "decode speedup"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in summary.runs:
        table.add_row(r.name, f"{r.relative_error:.2e}", f"{r.argmax_agreement:.1%}", _rate(r.prefill_tokens_per_second),
                      _rate(r.decode_tokens_per_second), _ratio(summary.speedup(r.name, "prefill")),
                      _ratio(summary.speedup(r.name, "decode")))
    out.print(table)
    out.print(f"llama.cpp results: {summary.file} (`puzzle report` puts them in the report)")


def vllm_engine(summary, label: str = "") -> None:
    """Each model in vLLM: its log-probabilities against transformers', and its speed against the parent's there."""
    table = Table(title=f"{label}vLLM: {summary.tokens} held-out tokens, log-probabilities checked against transformers")
    for column in ("model", "max |Δ log p|", "argmax agreement", "prefill tok/s", "decode tok/s", "prefill speedup",
                   "decode speedup"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for i, name in enumerate(summary.models):
        check = summary.agreements[i]
        if check is None:
            table.add_row(name, f"refused: {summary.errors[i]}", "", "", "", "", "")
            continue
        table.add_row(name, f"{check.max_logprob_error:.1e}", f"{check.argmax_agreement:.1%}",
                      _rate(summary.prefill_tokens_per_second[i]), _rate(summary.decode_tokens_per_second[i]),
                      _ratio(summary.speedup(i, "prefill")), _ratio(summary.speedup(i, "decode")))
    out.print(table)
    out.print(f"vLLM results: {summary.file} (`puzzle report` puts them in the report)")


def fusion(summary, label: str = "") -> None:
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



def report(summary) -> None:
    out.print(f"report: {summary.html} (markdown: {summary.markdown}; {len(summary.plots)} plots)")



def child(summary) -> None:
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



def search(job: PuzzleConfig, outcome) -> None:
    for note in outcome.notes:
        out.print(note)
    method = "MIP" if outcome.method == "mip" else outcome.method
    for n, sol in enumerate(outcome.solutions):
        table = Table(title=f"solution {n} by {method}: objective {sol.objective:.4f} ({job.search.metric}, sum over layers)")
        table.add_column("layer", justify="right")
        table.add_column("block")
        table.add_column("score", justify="right")
        for i, layer in enumerate(sol.layers):
            table.add_row(str(i), str(layer.choice), f"{layer.score:.4f}")
        out.print(table)
        for quantity, u in sol.usage.items():
            out.print(f"  {quantity}: {u.used:.6g} of {u.limit:.6g} ({u.used / u.parent:.2f}x the parent)")
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


def frontier(job: PuzzleConfig, sweep: str, points, table_file, plot_file) -> None:
    table = Table(title=f"frontier {sweep} ({job.search.metric}, lower is better)")
    for column in ("budget", "limit", "MIP objective", "used", "greedy objective"):
        table.add_column(column, justify="right")
    for p in points:
        fmt = lambda v: "infeasible" if v is None else f"{v:.6g}"  # noqa: E731
        table.add_row(p.budget, f"{p.limit:.6g}", fmt(p.objective), fmt(p.used), fmt(p.greedy_objective))
    out.print(table)
    out.print(f"frontier: {table_file}, plot: {plot_file}")


def memory_plan(plan) -> None:
    from puzzle.memory import gib

    t = plan.target
    table = Table(title=f"memory plan per rank on {t.name}: {gib(t.capacity)} per rank, {t.ranks} rank(s)")
    for column in ("stage", "part", "GiB", "fits"):
        table.add_column(column, justify="right" if column == "GiB" else "left")
    for stage in plan.stages:
        for term in stage.terms:
            where = " [host]" if term.host and t.is_gpu else ""
            phase = f"{term.phase.value}: " if term.phase else ""  # the peak counts only the heavier phase
            table.add_row("", phase + term.name + where, f"{term.bytes / 2**30:.2f}", "")
        verdict = "yes" if plan.fits(stage.stage) else "[red]NO[/red]"
        table.add_row(stage.stage.value, f"[bold]peak[/bold]{' — ' + stage.note if stage.note else ''}",
                      f"[bold]{stage.peak(t) / 2**30:.2f}[/bold]", verdict, end_section=True)
    out.print(table)
