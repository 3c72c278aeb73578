"""`ProbeReport`: per-layer probe results, their JSON form and the saved run folder
(metrics.json, plots, report.md); `with_model_control` merges a second model's report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lens_steer.io import write_json, write_text
from probes.metrics import METRICS
from probes.plots import render_report_md, save_plots


@dataclass
class ProbeReport:
    """Per-layer probe results. `layers` holds one JSON-ready row per layer: the main task's
    (all kept classes) metrics at top level, pairs under `pairs`, controls as `control_*`
    (shuffled labels), `majority_*` and, when a second model's cache was probed, `model_control_*`.
    """
    layers: list[dict]
    classes: list[str]
    class_counts: dict[str, int]
    tasks: dict[str, list[str]]
    config: dict
    n_thoughts: int
    n_groups: int
    dropped_classes: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    best_layer_metric: str = "balanced_accuracy_mean"
    maps: dict[int, dict] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def best_layer(self) -> int:
        """The layer with the highest cross-validated main-task `best_layer_metric`."""
        vals = [row[self.best_layer_metric] for row in self.layers]
        vals = [-math.inf if v is None or math.isnan(v) else v for v in vals]
        return self.layers[int(np.argmax(vals))]["layer"]

    def layer(self, layer: int) -> dict:
        for row in self.layers:
            if row["layer"] == layer:
                return row
        raise KeyError(f"layer {layer} not probed; probed layers: {self.layer_ids}")

    @property
    def layer_ids(self) -> list[int]:
        return [row["layer"] for row in self.layers]

    def to_json(self) -> dict:
        """metrics.json content (2-D maps are left out; they are plotted by `save`)."""
        return {
            "best_layer": self.best_layer,
            "best_layer_metric": self.best_layer_metric,
            "classes": self.classes,
            "class_counts": self.class_counts,
            "tasks": self.tasks,
            "n_thoughts": self.n_thoughts,
            "n_groups": self.n_groups,
            "dropped_classes": self.dropped_classes,
            "warnings": self.warnings,
            "config": self.config,
            "timings": self.timings,
            "layers": _json_safe(self.layers),
        }

    def save(self, out_dir: str | Path, *, plots: bool = True) -> Path:
        """Write `metrics.json`, the PNG plots and `report.md` (all atomically) to `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "metrics.json", self.to_json())
        images = save_plots(self, out) if plots else {}
        write_text(out / "report.md", render_report_md(self, images))
        return out


def with_model_control(report: ProbeReport, control: ProbeReport,
                       name: str = "model_control") -> ProbeReport:
    """Record `control` (the same probes on a second model's activations, e.g. random weights of
    the same architecture) in `report` as `{name}_*` fields and `{name}_selectivity`, layer by
    layer and task by task. Both must have been run on the same thoughts and labels."""
    if control.classes != report.classes or control.n_thoughts != report.n_thoughts:
        raise ValueError("control report was run on different thoughts or labels "
                         f"({control.n_thoughts} thoughts, classes {control.classes}) than the "
                         f"report ({report.n_thoughts}, {report.classes}); probe the same "
                         "thoughts in both caches")
    ctrl = {row["layer"]: row for row in control.layers}
    for row in report.layers:
        c = ctrl.get(row["layer"])
        if c is None:
            continue
        _merge_control(row, c, name)
        for pname, prow in row.get("pairs", {}).items():
            if pname in c.get("pairs", {}):
                _merge_control(prow, c["pairs"][pname], name)
    report.config[name] = control.config.get("source", "second activations")
    return report


def _merge_control(row: dict, c: dict, name: str) -> None:
    for m in METRICS:
        row[f"{name}_{m}_mean"] = c[f"{m}_mean"]
        row[f"{name}_{m}_std"] = c[f"{m}_std"]
    row[f"{name}_selectivity"] = row["accuracy_mean"] - c["accuracy_mean"]


def _json_safe(obj):
    """NaN/inf -> None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
