"""`lens-steer ablation`: which thought types the SEAL vector suppresses (reflection only,
transition only, both) and where it is applied (delimiter steps only vs every new token)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.common import SteeringStudyConfig
from experiments.config import field, register_command
from experiments.pipeline import SteeringPipeline, merge_records
from experiments.run_folder import RunFolder, markdown_table

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend

VARIANTS = ("reflection", "transition", "both")
PLACEMENTS = {"delimiter": "think_delimiter", "every-token": "newest"}


@dataclasses.dataclass
class AblationConfig(SteeringStudyConfig):
    variants: list[str] = field(default_factory=lambda: list(VARIANTS), choices=VARIANTS)
    """SEAL variants to compare."""
    placements: list[str] = field(default_factory=lambda: list(PLACEMENTS),
                                  choices=tuple(PLACEMENTS))
    """Where the vector is added: "delimiter" and/or "every-token"."""


def register(sub: argparse._SubParsersAction) -> None:
    register_command(sub, "ablation", "SEAL variants x placements", AblationConfig, run_ablation)


def run_ablation(cfg: AblationConfig, out: Path, model: ModelBackend | None = None) -> Path:
    run = RunFolder(out)
    pipe = SteeringPipeline(dataclasses.replace(cfg, method="seal"), run, model)
    run.write_config(cfg, "ablation")
    base = pipe.evaluate("base")
    rows, names = [], ["base"]
    for variant in cfg.variants:
        vec = pipe.seal_vector(variant=variant)
        for placement in cfg.placements:
            name = f"seal-{variant}-{placement}"
            iv = vec.intervention(pipe.model, scale=cfg.alpha, rule=PLACEMENTS[placement])
            s = pipe.evaluate(name, [iv])
            names.append(name)
            t = s["thoughts_per_trace"]
            rows.append({"variant": variant, "placement": placement,
                         "accuracy": s["accuracy"], "mean_tokens": s["mean_tokens"],
                         "reflection": t.get("reflection"), "transition": t.get("transition"),
                         "execution": t.get("execution")})
    merge_records(run, names)
    run.write_metrics({"layer": pipe.layer, "alpha": cfg.alpha, "base": base, "conditions": rows})
    run.save_figure(_figure(rows, base), "ablation.png")
    bt = base["thoughts_per_trace"]
    run.write_report(
        f"# SEAL ablation (layer {pipe.layer}, alpha {cfg.alpha}, model {cfg.model})\n\n"
        f"Base: accuracy {base['accuracy']:.3f}, mean tokens {base['mean_tokens']:.1f}, "
        f"reflection {bt.get('reflection', 0):.2f} / transition {bt.get('transition', 0):.2f} "
        "per trace.\n\n![ablation](ablation.png)\n\n" + markdown_table(rows))
    return run.path


def _figure(rows: list[dict], base: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = ["base"] + [f"{r['variant']}\n{r['placement']}" for r in rows]
    bt = base["thoughts_per_trace"]
    refl = [bt.get("reflection", 0)] + [r["reflection"] or 0 for r in rows]
    trans = [bt.get("transition", 0)] + [r["transition"] or 0 for r in rows]
    acc = [base["accuracy"]] + [r["accuracy"] for r in rows]
    x = np.arange(len(names))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 3.8))
    a1.bar(x - 0.2, refl, 0.4, label="reflection")
    a1.bar(x + 0.2, trans, 0.4, label="transition")
    a1.set_ylabel("thoughts per trace")
    a2.bar(x, acc, color="tab:green")
    a2.set_ylabel("accuracy")
    for ax in (a1, a2):
        ax.set_xticks(x, names, fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    a1.legend()
    fig.tight_layout()
    return fig
