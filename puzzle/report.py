"""`puzzle report`: one page per job on what the compression gained and lost.

RUN_DIR/report/report.html (self-contained: the plots are embedded, it opens from anywhere) and its
markdown twin report.md with the plots as PNG files beside it. Built from the stage outputs only
(parent summary, search, child, KD, eval), so it can be rebuilt at any time without a model.
"""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from puzzle.blocks.errors import PuzzleError
from puzzle.blocks.io import atomic_path, atomic_write_text
from puzzle.blocks.specs import AttentionKind, FfnKind, spec_from_id
from puzzle.config import PuzzleConfig
from puzzle.families import parent_shapes
from puzzle.parents import parent_config
from puzzle.rundir import RunDir, Stage
from puzzle.search_stage import QUANTITY, frontier_points, plot_frontier
from puzzle.search.budgets import parse_budget

PLOTS = ("architecture.png", "frontier.png", "kd.png")


@dataclass(frozen=True)
class ReportSummary:
    html: Path
    markdown: Path
    plots: list[Path]
    seconds: float


def _json(path: Path, command: str) -> dict:
    if not path.is_file():
        raise PuzzleError(f"{path} does not exist; run `puzzle {command}` first")
    return json.loads(path.read_text())


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
            "prefill tokens/s (measured)": f"{m['prefill_tokens_per_second']:,.0f}",
            "decode tokens/s (measured)": f"{m['decode_tokens_per_second']:,.0f}",
            "latency per batch, s (measured)": f"{m['measured_latency']:.4f}",
            "speedup (measured)": f"{parent['measured_latency'] / m['measured_latency']:.2f}x",
            "speedup (predicted by the cost model)": "n/a" if predicted is None else f"{predicted:.2f}x",
        }
    return pd.DataFrame(rows)


def architecture_table(child_info: dict, solution: dict) -> pd.DataFrame:
    scores = {layer["layer"]: layer.get("score") for layer in solution["layers"]}
    return pd.DataFrame([
        {"layer": i, "attention": x["attention"], "FFN": x["ffn"] + (" (coupled)" if x["coupled"] else ""),
         "block score": "" if scores.get(i) is None else f"{scores[i]:.4f}"}
        for i, x in enumerate(child_info["layers"])
    ]).set_index("layer")


def markdown_table(frame: pd.DataFrame) -> str:
    header = [frame.index.name or ""] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in frame.iterrows():
        lines.append("| " + " | ".join([str(index)] + [str(v) for v in row]) + " |")
    return "\n".join(lines)


# --- plots ----------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(block_id: str, parent_id: str) -> tuple[str, float]:
    """Short cell text and how much of the parent's subblock is kept (0 = removed, 1 = the parent's)."""
    spec, parent = spec_from_id(block_id), spec_from_id(parent_id)
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
    return f"{spec.num_experts} of {parent.num_experts}\nexperts", 0.2 + 0.8 * spec.num_experts / parent.num_experts


def plot_architecture(layers: list[dict], parent_layers: list[tuple[str, str]], path: Path) -> None:
    plt = _pyplot()
    n = len(layers)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * n + 1.5), 2.6))
    cmap = plt.get_cmap("Blues")
    for i, (x, (p_attention, p_ffn)) in enumerate(zip(layers, parent_layers)):
        for row, (block, parent_block) in enumerate(((x["attention"], p_attention), (x["ffn"], p_ffn))):
            text, kept = _label(block, parent_block)
            ax.add_patch(plt.Rectangle((i, 1 - row), 0.95, 0.9, color=cmap(0.1 + 0.75 * kept)))
            ax.text(i + 0.475, 1.45 - row, text, ha="center", va="center", fontsize=8,
                    color="white" if kept > 0.6 else "black")
    ax.set_xlim(0, n)
    ax.set_ylim(0, 2)
    ax.set_xticks([i + 0.475 for i in range(n)], [str(i) for i in range(n)])
    ax.set_yticks([1.45, 0.45], ["attention", "FFN"])
    ax.set_xlabel("layer (darker = more of the parent's block kept)")
    ax.set_title("child architecture")
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    _save(fig, path)


def plot_kd(train_log: pd.DataFrame, path: Path) -> None:
    plt = _pyplot()
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
    _save(fig, path)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)


def _frontier(config: PuzzleConfig, solutions: dict, path: Path) -> Path | None:
    """The quality/cost frontier along the job's first budget, with the chosen child marked."""
    budgets = [f"{k}={v}" for k, v in config.search.budgets.items()] or list(solutions["solutions"][0]["usage"])
    if not budgets or "=" not in budgets[0]:
        return None
    kind = parse_budget(budgets[0]).kind
    sweep = f"{kind.value}=0.2x:1.0x:9"
    points, parent_cost = frontier_points(config, sweep, [])
    best = solutions["solutions"][0]
    chosen = next(((u["used"] / u["parent"], best["objective"]) for label, u in best.get("usage", {}).items()
                   if QUANTITY[parse_budget(label).kind] == QUANTITY[kind]), None)
    plot_frontier(points, parent_cost, sweep, config.search.metric, path, chosen)
    return path


# --- the page -------------------------------------------------------------------------------------


def report_stage(config: PuzzleConfig) -> ReportSummary:
    started = time.time()
    run = RunDir.of(config)
    solutions = _json(run.stage_dir(Stage.search) / "solutions.json", "search")
    child_info = _json(run.stage_dir(Stage.child) / "checkpoint" / "puzzle_child.json", "realize")
    results = _json(run.stage_dir(Stage.eval) / "results.json", "eval")
    kd_dir = run.stage_dir(Stage.kd)
    directory = run.stage_dir(Stage.report)
    directory.mkdir(parents=True, exist_ok=True)

    parent_layers = [(s.attention.id, s.ffn.id) for s in parent_shapes(parent_config(config.parent))]
    plots = []
    plot_architecture(child_info["layers"], parent_layers, directory / "architecture.png")
    plots.append(directory / "architecture.png")
    frontier = _frontier(config, solutions, directory / "frontier.png")
    if frontier is not None:
        plots.append(frontier)
    kd_summary = None
    if (kd_dir / "train_log.csv").is_file() and run.done_fingerprint(Stage.kd) is not None:
        plot_kd(pd.read_csv(kd_dir / "train_log.csv", index_col="step"), directory / "kd.png")
        plots.append(directory / "kd.png")
        kd_summary = json.loads((kd_dir / "summary.json").read_text())

    comparison = comparison_table(results)
    comparison.index.name = "measure"
    architecture = architecture_table(child_info, solutions["solutions"][0])
    facts = _facts(config, solutions, results, kd_summary)
    md = _markdown(config, facts, comparison, architecture, plots)
    page = _html(config, facts, comparison, architecture, plots)
    atomic_write_text(directory / "report.md", md)
    atomic_write_text(directory / "report.html", page)
    return ReportSummary(directory / "report.html", directory / "report.md", plots, time.time() - started)


def _facts(config: PuzzleConfig, solutions: dict, results: dict, kd: dict | None) -> list[str]:
    s = results["scenario"]
    usage = solutions["solutions"][0].get("usage", {})
    facts = [
        "budgets: " + ", ".join(f"{label} (used {u['used'] / u['parent']:.2f}x of the parent)" for label, u in usage.items()),
        f"search: {solutions.get('method', 'mip')}, objective {solutions['solutions'][0]['objective']:.4f} "
        f"(sum of per-block {config.search.metric})",
        f"scenario: batch {s['batch_size']}, prefill {s['prefill_length']}, decode {s['decode_length']} tokens; "
        f"weights {s['weight_dtype']}, KV cache {s['kv_dtype']}",
        f"measured on {results['device']}; predicted by the cost model of the profile stage",
        f"quality on {results['validation_tokens']:,} held-out tokens",
    ]
    if kd is not None:
        facts.append(f"global KD: {kd['steps']} steps, {kd['tokens']:,} tokens; held-out KL "
                     f"{kd['before']['kl']:.4f} → {kd['after']['kl']:.4f}")
    return facts


def _markdown(config, facts, comparison, architecture, plots) -> str:
    images = "\n\n".join(f"![{p.stem}]({p.name})" for p in plots)
    return (
        f"# puzzle report: {config.run.job or config.run.dir.name}\n\n"
        + "\n".join(f"- {f}" for f in facts)
        + "\n\n## Parent and child\n\n" + markdown_table(comparison)
        + "\n\n## Child architecture\n\n" + markdown_table(architecture)
        + "\n\n## Plots\n\n" + images + "\n"
    )


def _html(config, facts, comparison, architecture, plots) -> str:
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
<h2>Parent and child</h2>
{comparison.to_html(escape=True)}
<h2>Child architecture</h2>
{architecture.to_html(escape=True)}
<h2>Plots</h2>
{''.join(img(p) for p in plots)}
</body></html>
"""
