"""The report stage (`puzzle report`): one page per job on what the compression gained and lost.

report/report.html (self-contained: the plots are embedded, it opens from anywhere) and its
markdown twin report.md with the plots as PNG files beside it. Built from the stage outputs only
(parent summary, search, child, KD, eval), so it can be rebuilt at any time without a model.
"""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from puzzle.io import atomic_write_text, read_json, sha256_file
from puzzle.blocks.specs import AttentionKind, BlockChoice, FfnKind, SubblockSpec
from puzzle.checkpoint import child_choices
from puzzle.config import PuzzleConfig
from puzzle.families import parent_shapes
from puzzle.parents import parent_config
from puzzle.pipeline import StageContext
from puzzle.plots import pyplot, save
from puzzle.problem import job_frontier, plot_frontier
from puzzle.rundir import RunDir, Stage
from puzzle.search.budgets import parse_budget, parse_sweep
from puzzle.search.problem import QUANTITY
from puzzle.solutions import Architecture, read_solutions


@dataclass(frozen=True)
class ReportSummary:
    html: Path
    markdown: Path
    plots: list[Path]
    seconds: float


# --- tables ---------------------------------------------------------------------------------------


def comparison_table(results: dict) -> pd.DataFrame:
    """Parent vs child (vs distilled child): quality, size and speed, one column per model."""
    parent = results["models"][0]
    rows = {}
    for m in results["models"]:
        predicted = (parent["predicted_latency"] / m["predicted_latency"]
                     if parent["predicted_latency"] and m["predicted_latency"] else None)
        rows[m["name"]] = {
            "KL(parent ‖ model)": f"{m['kl']:.4f}",
            "perplexity": f"{m['perplexity']:.2f}",
            "top-1 agreement": f"{m['top1']:.1%}",
            "parameters": f"{m['parameters']:,} ({m['parameters'] / parent['parameters']:.2f}x)",
            "weights MiB": f"{m['weight_bytes'] / 2**20:.2f}",
            "KV cache MiB": f"{m['kv_bytes'] / 2**20:.3f}",
            "prefill tokens/s (measured)": _shown(m["prefill_tokens_per_second"], ",.0f"),
            "decode tokens/s (measured)": _shown(m["decode_tokens_per_second"], ",.0f"),
            "latency per batch, s (measured)": _shown(m["measured_latency"], ".4f"),
            "speedup (measured)": _shown(m["measured_latency"] and parent["measured_latency"] / m["measured_latency"],
                                         ".2f", "x"),
            "speedup (predicted by the cost model)": "n/a" if predicted is None else f"{predicted:.2f}x",
            **{f"{task} accuracy": f"{metrics['acc,none']:.1%}" for task, metrics in m.get("tasks", {}).items()
               if "acc,none" in metrics},
            **{row: value for name, *_ in ENGINES.values() for row, value in m.get(name, {}).items()},
        }
    return pd.DataFrame(rows)


def _shown(value: float | None, spec: str, unit: str = "") -> str:
    """A measured number, or why there is none (a multi-process eval does not time sharded models)."""
    return "not measured (sharded)" if value is None else f"{value:{spec}}{unit}"


def architecture_table(choices: list[BlockChoice], solution: Architecture) -> pd.DataFrame:
    scores = [layer.score for layer in solution.layers]
    return pd.DataFrame([
        {"layer": i, "attention": c.attention.id, "FFN": c.ffn.id + (" (coupled)" if c.coupled else ""),
         "block score": "" if scores[i] is None else f"{scores[i]:.4f}"}
        for i, c in enumerate(choices)
    ]).set_index("layer")


def markdown_table(frame: pd.DataFrame) -> str:
    header = [frame.index.name or ""] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in frame.iterrows():
        lines.append("| " + " | ".join([str(index)] + [str(v) for v in row]) + " |")
    return "\n".join(lines)


# --- plots ----------------------------------------------------------------------------------------


def _label(spec: SubblockSpec, parent: SubblockSpec) -> tuple[str, float]:
    """Short cell text and how much of the parent's subblock is kept (0 = removed, 1 = the parent's)."""
    if spec == parent:
        return "parent", 1.0
    if spec.removed:
        return "removed", 0.0
    if spec.linear:
        return "linear", 0.15
    if spec.kind is AttentionKind.attention:
        text = f"{spec.num_key_value_heads} kv" + (f"\nwin {spec.window}" if spec.window else "")
        kept = spec.num_key_value_heads / parent.num_key_value_heads
        return text, 0.3 + 0.6 * kept * (0.7 if spec.window else 1.0)
    if spec.kind is FfnKind.dense:
        return f"{spec.intermediate_size}", 0.2 + 0.8 * spec.intermediate_size / parent.intermediate_size
    routed = spec.experts_per_token / parent.experts_per_token  # fewer per token: lighter, and said
    text = f"{spec.num_experts} of {parent.num_experts}\nexperts" + (f", top {spec.experts_per_token}" if routed < 1 else "")
    return text, 0.2 + 0.8 * spec.num_experts / parent.num_experts * (0.5 + 0.5 * routed)


def _hybrid_label(choice: BlockChoice, parent: BlockChoice) -> tuple[str, float]:
    """A hybrid layer's one mixer: its type, what is kept of it, and how much (0 = the layer removed)."""
    token_mixer = not parent.attention.removed
    spec, own = (choice.attention, parent.attention) if token_mixer else (choice.ffn, parent.ffn)
    kind = ("Mamba" if own.kind is AttentionKind.mamba else "attention" if token_mixer
            else "MoE" if own.kind is FfnKind.moe else "MLP")
    if spec.removed:
        return f"removed\n({kind})", 0.0
    if spec == own:
        return kind, 1.0
    if spec.kind is AttentionKind.mamba:
        kept = spec.mamba_num_heads / own.mamba_num_heads
        return f"Mamba\n{spec.mamba_num_heads} of {own.mamba_num_heads}\nheads", 0.2 + 0.8 * kept
    text, kept = _label(spec, own)
    return f"{kind}\n{text}", kept


def plot_architecture(choices: list[BlockChoice], parent: list[BlockChoice], path: Path) -> None:
    """One row per subblock kind (attention, FFN), or, for a hybrid parent whose layers are each one mixer, one
    row of mixers named by type."""
    plt = pyplot()
    n = len(choices)
    hybrid = all(p.attention.removed or p.ffn.removed for p in parent)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * n + 1.5), 1.8 if hybrid else 2.6))
    cmap = plt.get_cmap("Blues")
    for i, (c, p) in enumerate(zip(choices, parent)):
        cells = ([_hybrid_label(c, p)] if hybrid
                 else [_label(block, own) for block, own in ((c.attention, p.attention), (c.ffn, p.ffn))])
        for row, (text, kept) in enumerate(cells):
            ax.add_patch(plt.Rectangle((i, 1 - row), 0.95, 0.9, color=cmap(0.1 + 0.75 * kept)))
            ax.text(i + 0.475, 1.45 - row, text, ha="center", va="center", fontsize=8,
                    color="white" if kept > 0.6 else "black")
    ax.set_xlim(0, n)
    ax.set_ylim(1 if hybrid else 0, 2)
    ax.set_xticks([i + 0.475 for i in range(n)], [str(i) for i in range(n)])
    ax.set_yticks([1.45] if hybrid else [1.45, 0.45], ["mixer"] if hybrid else ["attention", "FFN"])
    ax.set_xlabel("layer (darker = more of the parent's block kept)")
    ax.set_title("child architecture")
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    save(fig, path)


def plot_kd(train_log: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for column in ("total", "kl", "cosine"):
        if column in train_log and train_log[column].abs().sum() > 0:
            ax.plot(train_log.index, train_log[column], label=column, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("global KD")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save(fig, path)


def _frontier(config: PuzzleConfig, solution: Architecture, path: Path, held_out_kl: float) -> Path | None:
    """The quality/cost frontier along the job's first budget, with the chosen child marked where the sum of
    its scores puts it, and where its KL measured whole does (by the search, when it measured; by eval)."""
    # The search may have had its budgets from --budget, which the report's config does not carry.
    kinds = list(config.search.budgets) or [parse_budget(u.budget).kind for u in solution.usage.values()]
    if not kinds:
        return None
    sweep = parse_sweep(f"{kinds[0].value}=0.2x:1.0x:9")
    points, parent_cost = job_frontier(config, sweep)
    quantity = QUANTITY[kinds[0]]
    cost = next((u.used / u.parent for q, u in solution.usage.items() if q == quantity), None)
    marks = [] if cost is None else [("this child: predicted (sum of scores)", cost, solution.objective, "rD")]
    if cost is not None and config.search.metric == "kl":
        if solution.measured_kl is not None:
            marks.append(("this child: KL measured by the search", cost, solution.measured_kl, "m^"))
        marks.append(("this child: KL on held-out text (eval)", cost, held_out_kl, "gv"))
    plot_frontier(points, parent_cost, sweep.text, config.search.metric, path, marks)
    return path


# --- the page -------------------------------------------------------------------------------------


# Each engine's measurements in eval/ (`puzzle eval --engine`): its name in the report, and how its logits were
# checked against transformers (the field of each run that holds it).
ENGINES = {"llama_cpp.json": ("llama.cpp", "logits rel. error", "relative_error"),
           "vllm.json": ("vLLM", "max |Δ log p|", "max_logprob_error")}


def key_extra(config: PuzzleConfig, run: RunDir) -> str:
    """The engines' measurements (`puzzle eval --engine vllm|llama.cpp`) enter the report when they are made."""
    files = [run.stage_dir(Stage.eval) / name for name in ENGINES]
    return "+".join(sha256_file(f)[:16] for f in files if f.is_file()) or "no-engine"


def engine_rows(results: dict, engine: dict, file: str = "llama_cpp.json") -> None:
    """An engine's measurements (its eval/ `file`) put beside each model's column of the comparison table (in place)."""
    name, check, field = ENGINES[file]
    runs = {r["name"]: r for r in engine["runs"]}
    parent = runs.get("parent")
    for m in results["models"]:
        r = runs.get(m["name"])
        if r is None or parent is None or parent.get("error"):
            continue
        if r.get("error"):
            m[name] = {name: f"refused: {r['error']}"}
            continue
        m[name] = {
            f"{name} {check} / argmax agreement": f"{r[field]:.1e} / {r['argmax_agreement']:.1%}",
            f"{name} decode tokens/s": f"{r['decode_tokens_per_second']:,.0f}",
            f"speedup in {name} (decode / prefill)": f"{r['decode_tokens_per_second'] / parent['decode_tokens_per_second']:.2f}x"
                                                     f" / {r['prefill_tokens_per_second'] / parent['prefill_tokens_per_second']:.2f}x",
        }


def run(ctx: StageContext) -> ReportSummary:
    started = time.time()
    config, run_dir, directory = ctx.config, ctx.run, ctx.directory
    solutions = read_solutions(run_dir.stage_dir(Stage.search) / "solutions.json")
    choices = child_choices(run_dir.stage_dir(Stage.child) / "checkpoint")
    results = read_json(run_dir.stage_dir(Stage.eval) / "results.json")
    for file in ENGINES:
        if (run_dir.stage_dir(Stage.eval) / file).is_file():
            engine_rows(results, read_json(run_dir.stage_dir(Stage.eval) / file), file)
    kd_dir = run_dir.stage_dir(Stage.kd)
    directory.mkdir(parents=True, exist_ok=True)

    parent = [BlockChoice(s.attention, s.ffn) for s in parent_shapes(parent_config(config.parent))]
    best = solutions.solutions[0]
    plots = [directory / "architecture.png"]
    plot_architecture(choices, parent, plots[0])
    child_kl = next(m["kl"] for m in results["models"] if m["name"] == "child")
    frontier = _frontier(config, best, directory / "frontier.png", child_kl)
    if frontier is not None:
        plots.append(frontier)
    kd_summary = None
    if (kd_dir / "train_log.csv").is_file() and run_dir.done_fingerprint(Stage.kd) is not None:
        plot_kd(pd.read_csv(kd_dir / "train_log.csv", index_col="step"), directory / "kd.png")
        plots.append(directory / "kd.png")
        kd_summary = read_json(kd_dir / "summary.json")

    comparison = comparison_table(results)
    comparison.index.name = "measure"
    sections = [("Parent and child", comparison), ("Child architecture", architecture_table(choices, best))]
    measured = measured_table(solutions.solutions)
    if measured is not None:
        sections.append(("Search: predicted and measured KL of the children it measured", measured))
    facts = _facts(config, solutions.method, best, results, kd_summary)
    atomic_write_text(directory / "report.md", _markdown(config, facts, sections, plots))
    atomic_write_text(directory / "report.html", _html(config, facts, sections, plots))
    ctx.record.outputs = {"html": "report.html", "markdown": "report.md", "plots": [p.name for p in plots]}
    return ReportSummary(directory / "report.html", directory / "report.md", plots, time.time() - started)


def read(ctx: StageContext) -> ReportSummary:
    plots = [ctx.directory / name for name in ("architecture.png", "frontier.png", "kd.png")]
    return ReportSummary(ctx.directory / "report.html", ctx.directory / "report.md", [p for p in plots if p.is_file()],
                         0.0)


def _facts(config: PuzzleConfig, method: str, best: Architecture, results: dict, kd: dict | None) -> list[str]:
    s = results["scenario"]
    facts = [
        "budgets: " + ", ".join(f"{u.budget} (used {u.used / u.parent:.2f}x of the parent)" for u in best.usage.values()),
        f"search: {method}, objective {best.objective:.4f} (sum of per-block {config.search.metric})"
        + (f"; measured KL of the whole child {best.measured_kl:.4f}" if best.measured_kl is not None else ""),
        f"scenario: batch {s['batch_size']}, prefill {s['prefill_length']}, decode {s['decode_length']} tokens; "
        f"weights {s['weight_dtype']}, KV cache {s['kv_dtype']}",
        f"measured on {results['device']}; predicted by the cost model of the profile stage",
        f"quality on {results['validation_tokens']:,} held-out tokens",
    ]
    if kd is not None:
        facts.append(f"global KD: {kd['steps']} steps, {kd['tokens']:,} tokens; held-out KL "
                     f"{kd['before']['kl']:.4f} → {kd['after']['kl']:.4f}")
    return facts


def measured_table(solutions: list[Architecture]) -> pd.DataFrame | None:
    """The children the search measured whole (search.candidates, evolve): the sum of their blocks' scores
    (what the MIP predicts) beside their measured KL, the chosen one first; None when none was measured."""
    if not any(a.measured_kl is not None for a in solutions):
        return None
    tournament = any(a.tournament_kl is not None for a in solutions)
    return pd.DataFrame([
        {"solution": k, "found by": "MIP" if a.status.value in ("optimal", "feasible") else "measured refinement",
         "predicted: sum of block scores": f"{a.objective:.5f}", "measured KL": f"{a.measured_kl:.5f}",
         "measured / predicted": f"{a.measured_kl / a.objective:.2f}" if a.objective > 0 else "n/a",
         **({"KL after the tournament's short KD": "" if a.tournament_kl is None else f"{a.tournament_kl:.5f}"}
            if tournament else {})}
        for k, a in enumerate(solutions)
    ]).set_index("solution")


def _markdown(config, facts, sections: list[tuple[str, pd.DataFrame]], plots) -> str:
    images = "\n\n".join(f"![{p.stem}]({p.name})" for p in plots)
    return (
        f"# puzzle report: {config.run.job or config.run.dir.name}\n\n"
        + "\n".join(f"- {f}" for f in facts)
        + "".join(f"\n\n## {title}\n\n" + markdown_table(frame) for title, frame in sections)
        + "\n\n## Plots\n\n" + images + "\n"
    )


def _html(config, facts, sections: list[tuple[str, pd.DataFrame]], plots) -> str:
    def img(p: Path) -> str:
        data = base64.b64encode(p.read_bytes()).decode()
        return f'<figure><img alt="{p.stem}" src="data:image/png;base64,{data}"></figure>'

    title = html.escape(f"puzzle report: {config.run.job or config.run.dir.name}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th {{ background: #f2f4f8; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{title}</h1>
<ul>{''.join(f'<li>{html.escape(f)}</li>' for f in facts)}</ul>
{''.join(f"<h2>{html.escape(title)}</h2>{frame.to_html(escape=True)}" for title, frame in sections)}
<h2>Plots</h2>
{''.join(img(p) for p in plots)}
</body></html>
"""
