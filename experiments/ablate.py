"""`lens-steer ablate`: ablate each block's attention and MLP output (and, on request, each
attention head) during generation on held-out problems, and report what the model's thoughts,
length and accuracy do against base: a heatmap (layer x component, one panel per metric) and a
table."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.common import StudyConfig, check_layers, prompts_for
from experiments.config import field, register_command
from experiments.pipeline import SteeringPipeline, merge_records
from experiments.run_folder import RunFolder, markdown_table
from lens_steer.ablation import (
    COMPONENTS,
    MODES,
    POSITIONS,
    Condition,
    ablation_conditions,
    ablation_intervention,
    deltas,
    site_means,
    summary_row,
)

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend

METRICS = (("accuracy_points", "Δ accuracy (points)"), ("mean_tokens", "Δ mean tokens"),
           ("reflection_per_trace", "Δ reflection / trace"),
           ("transition_per_trace", "Δ transition / trace"))


@dataclasses.dataclass
class AblateConfig(StudyConfig):
    """ablation"""

    layers: list[int] | None = None
    """Blocks to ablate; None = every block."""
    components: list[str] = field(default_factory=lambda: list(COMPONENTS),
                                  choices=tuple(COMPONENTS))
    """Block outputs to ablate: "attn" (blocks.L.hook_attn_out), "mlp" (blocks.L.hook_mlp_out)."""
    heads: bool = False
    """Also ablate each attention head alone (blocks.L.attn.hook_z, one head)."""
    mode: str = field("zero", choices=MODES)
    """"zero", or "mean" (the site's mean over every position of the model's own traces on
    the first --n-mean extraction problems)."""
    positions: str = field("every", choices=tuple(POSITIONS))
    """"every" position (prompt and generation) or "generated" (the newest position of each
    step: the last prompt token, then every new token)."""
    n_problems: int | None = field(48, minimum=1)
    """Evaluate on the first N problems of the shared held-out split (None = all --n-eval)."""
    n_mean: int = field(32, minimum=1)
    """--mode mean: extraction problems whose traces give the means."""


def register(sub: argparse._SubParsersAction) -> None:
    register_command(sub, "ablate", "ablate attention / MLP outputs (and heads) per layer "
                     "during generation", AblateConfig, run_ablate)


def own_traces(pipe: SteeringPipeline, n: int) -> list[list[int]]:
    """Token ids (prompt + generation) of the model's own traces on the first `n` extraction
    problems, generated once per settings through the pipeline's keyed evaluation."""
    from lens_steer.io import read_jsonl

    problems = pipe.extract_problems[:n]
    name = f"extract-first{len(problems)}"
    pipe.evaluate(name, problems=problems)
    rows = read_jsonl(pipe.run.path / "records" / f"{name}.jsonl")
    return [pipe.model.encode(p + r["generated_text"])
            for p, r in zip(prompts_for(problems, pipe.cfg.template), rows, strict=True)]


def ablation_study(pipe: SteeringPipeline, problems: Sequence[Any],
                   conditions: Sequence[Condition], mode: str = "zero",
                   positions: str = "every", n_mean: int = 32, prefix: str = ""
                   ) -> dict[str, Any]:
    """Base and every ablated condition on `problems` through `pipe.evaluate` (keyed, resumed):
    {"base": row, "conditions": [row + "change"], "names": evaluation names}."""
    means = None
    if mode == "mean":
        means = site_means(pipe.model, own_traces(pipe, n_mean),
                           sorted({c.site for c in conditions}))
    base = pipe.evaluate(f"{prefix}base", problems=problems)
    names, rows = [f"{prefix}base"], []
    for cond in conditions:
        name = f"{prefix}{cond.name}-{mode}"
        iv = ablation_intervention(cond, mode, means, positions)
        s = pipe.evaluate(name, [iv], problems=problems)
        names.append(name)
        rows.append({**summary_row(cond, s), "change": deltas(base, s)})
    return {"mode": mode, "positions": positions, "n_problems": len(problems),
            "means_from": f"{n_mean} extraction traces" if means else None,
            "base": summary_row(None, base), "conditions": rows, "names": names}


def run_ablate(cfg: AblateConfig, out: Path, model: ModelBackend | None = None) -> Path:
    run = RunFolder(out)
    pipe = SteeringPipeline(cfg, run, model)
    run.write_config(cfg, "ablate")
    m = pipe.model
    layers = check_layers(m, cfg.layers, "--layers") if cfg.layers is not None else None
    conds = ablation_conditions(m.n_layers, layers, cfg.components,
                                n_heads=m.n_heads if cfg.heads else 0)
    problems = pipe.eval_problems[:cfg.n_problems] if cfg.n_problems else pipe.eval_problems
    result = ablation_study(pipe, problems, conds, cfg.mode, cfg.positions, cfg.n_mean)
    merge_records(run, result.pop("names"))
    run.write_metrics({"model": m.describe(), **result})
    run.save_figure(heatmap(result), "ablation_heatmap.png")
    run.write_report(f"# Ablation study ({cfg.model})\n\n" + report_section(result))
    return run.path


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [{**result["base"], "Δ acc (pts)": 0.0, "Δ tokens": 0.0}]
    for r in result["conditions"]:
        rows.append({**r, "Δ acc (pts)": r["change"]["accuracy_points"],
                     "Δ tokens": r["change"]["mean_tokens"]})
    return rows


def report_section(result: dict[str, Any], figure: str = "ablation_heatmap.png") -> str:
    """Markdown: what was ablated, the heatmap, the table, and the largest effects."""
    b = result["base"]
    cols = ["condition", "accuracy", "Δ acc (pts)", "mean_tokens", "Δ tokens",
            "reflection_per_trace", "transition_per_trace", "unfinished_share"]
    worst = sorted(result["conditions"], key=lambda r: r["change"]["accuracy_points"])[:3]
    text = ", ".join(f"{r['condition']} ({r['change']['accuracy_points']:+.1f} points, "
                     f"{r['change']['mean_tokens']:+.0f} tokens, reflection "
                     f"{r['change']['reflection_per_trace']:+.2f} / trace)" for r in worst)
    where = ("every position" if result["positions"] == "every"
             else "the newest position of each step")
    return (f"{result['mode'].capitalize()}-ablation at {where} "
            + (f"(means over {result['means_from']}) " if result["means_from"] else "")
            + f"during greedy generation on {result['n_problems']} held-out problems. Base: "
            f"accuracy {b['accuracy']:.3f}, {b['mean_tokens']:.1f} tokens, reflection "
            f"{b['reflection_per_trace']:.2f} / transition {b['transition_per_trace']:.2f} per "
            f"trace. Largest accuracy drops: {text}.\n\n![ablation]({figure})\n\n"
            + markdown_table(table_rows(result), cols))


def heatmap(result: dict[str, Any]):
    """Layer x component grid, one panel per metric, colour = change against base."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    conds = result["conditions"]
    layers = sorted({r["layer"] for r in conds})
    cols = list(dict.fromkeys(r["component"] if r["head"] is None else f"h{r['head']}"
                              for r in conds))
    width = max(3.2, 0.55 * len(cols) + 1.6)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(width * len(METRICS),
                                                        0.5 * len(layers) + 1.8))
    for ax, (key, title) in zip(axes, METRICS, strict=True):
        grid = np.full((len(layers), len(cols)), np.nan)
        for r in conds:
            c = r["component"] if r["head"] is None else f"h{r['head']}"
            grid[layers.index(r["layer"]), cols.index(c)] = r["change"][key]
        lim = float(np.nanmax(np.abs(grid))) or 1.0
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                label = (f"{v:+.0f}" if abs(v) >= 100 else f"{v:+.1f}" if abs(v) >= 10
                         else f"{v:+.2f}")
                ax.text(j, i, label, ha="center", va="center", fontsize=7,
                        color="white" if abs(v) > 0.6 * lim else "black")
        ax.set_xticks(range(len(cols)), cols, fontsize=8)
        ax.set_yticks(range(len(layers)), [f"L{x}" for x in layers], fontsize=8)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{result['mode']}-ablation vs base ({result['n_problems']} held-out "
                 "problems)", fontsize=10)
    fig.tight_layout()
    return fig
