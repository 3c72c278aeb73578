"""`lens-steer layer-sweep`: the same vector method at every layer (or a list).

One loaded model, one cache; each layer is an evaluation point (resumable). Plot: accuracy,
mean tokens and reflection + transition thoughts per trace vs layer, with the base as a line.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.common import SteeringStudyConfig, check_layers
from experiments.config import field, register_command
from experiments.pipeline import SteeringPipeline, merge_records
from experiments.run_folder import RunFolder, markdown_table
from lens_steer.errors import ConfigError

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend


@dataclasses.dataclass
class LayerSweepConfig(SteeringStudyConfig):
    layers: list[int] | None = field(None, minimum=0)
    """Layers to sweep; None = every layer."""


def register(sub: argparse._SubParsersAction) -> None:
    register_command(sub, "layer-sweep", "accuracy and tokens vs steered layer",
                     LayerSweepConfig, run_layer_sweep)


def run_layer_sweep(cfg: LayerSweepConfig, out: Path, model: ModelBackend | None = None) -> Path:
    run = RunFolder(out)
    pipe = SteeringPipeline(cfg, run, model)
    layers = check_layers(pipe.model, cfg.layers if cfg.layers is not None
                          else range(pipe.model.n_layers), "--layers")
    if not layers:
        raise ConfigError("--layers is empty: give at least one layer (or omit it: all)")
    run.write_config(cfg, "layer-sweep")
    base = pipe.evaluate("base")
    rows = []
    for layer in layers:
        vec = pipe.vector(layer)
        summary = pipe.evaluate(f"{cfg.method}-L{layer}", [vec.intervention(pipe.model)])
        rows.append({"layer": layer, "scale": vec.scale, "vector_norm": vec.norm,
                     "accuracy": summary["accuracy"], "mean_tokens": summary["mean_tokens"],
                     "reflection_transition_per_trace":
                         summary["reflection_transition_per_trace"]})
    merge_records(run, ["base"] + [f"{cfg.method}-L{r['layer']}" for r in rows])
    run.write_metrics({"method": cfg.method, "base": base, "layers": rows})
    run.save_figure(sweep_figure(rows, "layer", base, f"{cfg.method.upper()} layer sweep"),
                    "layer_sweep.png")
    run.write_report(f"# Layer sweep ({cfg.method}, model {cfg.model})\n\n"
                     f"Base: accuracy {base['accuracy']:.3f}, mean tokens "
                     f"{base['mean_tokens']:.1f}.\n\n![layer sweep](layer_sweep.png)\n\n"
                     + markdown_table(rows))
    return run.path


def sweep_figure(rows: list[dict], x: str, base: dict, title: str, log_x: bool = False):
    """Three panels: accuracy, mean tokens, reflection + transition per trace vs `x`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("accuracy", "accuracy"), ("mean_tokens", "mean generated tokens"),
            ("reflection_transition_per_trace", "reflection + transition / trace")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    xs = [r[x] for r in rows]
    for ax, (key, label) in zip(axes, keys, strict=True):
        ax.plot(xs, [r[key] for r in rows], "o-", label="steered")
        ax.axhline(base[key], color="grey", ls="--", label="base")
        ax.set_xlabel(x)
        ax.set_ylabel(label)
        if log_x:
            ax.set_xscale("symlog", linthresh=0.1)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig
