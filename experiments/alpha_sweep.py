"""`lens-steer alpha-sweep`: steering strength vs accuracy and tokens.

SEAL: alpha values (H <- H + alpha * S at delimiters). ASC: multiples of the calibrated gamma,
or of `--asc-gamma` when given (e.g. `--asc-gamma 1 --strengths 20 40 60 80` sweeps gamma itself).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.common import SteeringStudyConfig
from experiments.config import field, register_command
from experiments.layer_sweep import sweep_figure
from experiments.pipeline import SteeringPipeline, merge_records
from experiments.run_folder import RunFolder, markdown_table
from lens_steer.errors import ConfigError

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend


@dataclasses.dataclass
class AlphaSweepConfig(SteeringStudyConfig):
    strengths: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0])
    """SEAL: alpha values; ASC: multiples of the calibrated gamma (or of `asc_gamma`)."""


def register(sub: argparse._SubParsersAction) -> None:
    register_command(sub, "alpha-sweep", "accuracy and tokens vs steering strength",
                     AlphaSweepConfig, run_alpha_sweep)


def run_alpha_sweep(cfg: AlphaSweepConfig, out: Path, model: ModelBackend | None = None) -> Path:
    if not cfg.strengths:
        raise ConfigError("--strengths is empty: give at least one strength")
    run = RunFolder(out)
    pipe = SteeringPipeline(cfg, run, model)
    run.write_config(cfg, "alpha-sweep")
    vec = pipe.vector()
    base = pipe.evaluate("base")
    rows, names = [], ["base"]
    for s in cfg.strengths:
        scale = s if cfg.method == "seal" else s * vec.scale
        name = f"{cfg.method}-x{s:g}"
        summary = pipe.evaluate(name, [vec.intervention(pipe.model, scale=scale)])
        names.append(name)
        rows.append({"strength": s, "scale": scale, "accuracy": summary["accuracy"],
                     "mean_tokens": summary["mean_tokens"],
                     "reflection_transition_per_trace":
                         summary["reflection_transition_per_trace"]})
    merge_records(run, names)
    label = "alpha" if cfg.method == "seal" else "gamma multiple"
    run.write_metrics({"method": cfg.method, "layer": vec.layer, "base": base,
                       "gamma_unit": vec.scale if cfg.method == "asc" else None,
                       "gamma_source": vec.provenance.get("gamma_source"),
                       "calibrated_gamma": (pipe.asc_calibration(vec)["gamma"]
                                            if cfg.method == "asc" else None),
                       "strengths": rows})
    run.save_figure(sweep_figure(rows, "strength", base,
                                 f"{cfg.method.upper()} strength sweep at layer {vec.layer} "
                                 f"({label})"), "alpha_sweep.png")
    run.write_report(f"# Strength sweep ({cfg.method}, layer {vec.layer}, model {cfg.model})\n\n"
                     f"x axis: {label}. Base: accuracy {base['accuracy']:.3f}, mean tokens "
                     f"{base['mean_tokens']:.1f}.\n\n![strength sweep](alpha_sweep.png)\n\n"
                     + markdown_table(rows))
    return run.path
