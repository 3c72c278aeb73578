"""`lens-steer probe-layers`: where are thought types separable?

generate traces → label thoughts → cache `resid_post` at thought positions (all layers) →
per-layer probes with controls → layer curve, 2-D maps, report. Optionally the same pipeline on
a random-weight model of the same architecture (`--random-control true`).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.common import StudyConfig
from experiments.config import field, register_command
from experiments.pipeline import SteeringPipeline, cache_key
from experiments.run_folder import RunFolder
from lens_steer.io import read_jsonl

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend


@dataclasses.dataclass
class ProbeLayersConfig(StudyConfig):
    n_folds: int = field(5, minimum=2)
    """Cross-validation folds (grouped by trace)."""
    probe_C: float = field(0.1, minimum=0)
    """Inverse L2 strength of the logistic-regression probe."""
    random_control: bool = False
    """Also probe a random-weight model of the same architecture on the same thoughts."""
    tsne: bool = True
    """Draw t-SNE maps next to PCA for the best layer."""


def register(sub: argparse._SubParsersAction) -> None:
    register_command(sub, "probe-layers", "generate traces, cache thoughts, probe every layer",
                     ProbeLayersConfig, run_probe_layers)


def random_weight_copy(model: ModelBackend) -> Path:
    """Save a random-initialised model with `model`'s config and tokenizer to a temp dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src = model.source
    out = Path(tempfile.mkdtemp(prefix="lens-steer-random-"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(out)
    model.tokenizer.save_pretrained(out)
    return out


def run_probe_layers(cfg: ProbeLayersConfig, out: Path, model: ModelBackend | None = None) -> Path:
    from lens_steer import load_model
    from probes import probe_layers

    run = RunFolder(out)
    pipe = SteeringPipeline(cfg, run, model)
    run.write_config(cfg, "probe-layers")
    model = pipe.model
    traces, gen_summary = pipe.extraction_traces("traces")
    run.write_records(read_jsonl(run.path / "traces_records.jsonl"))
    cache = pipe.cache(traces)
    control = None
    if cfg.random_control:
        rand = load_model(random_weight_copy(model), backend=cfg.backend)
        control = SteeringPipeline(cfg, run, rand).cache(traces, name="cache_random").to_dict()
    key = {"cache": cache_key(cache),
           "control": cfg.random_control, "n_folds": cfg.n_folds, "C": cfg.probe_C,
           "tsne": cfg.tsne, "seed": cfg.seed}

    def fit_probes() -> dict:
        report = probe_layers(cache.to_dict(), cache.labels, cache.groups, n_folds=cfg.n_folds,
                              C=cfg.probe_C, tsne=cfg.tsne, control_activations=control,
                              seed=cfg.seed)
        report.save(run.path / "probes")
        return report.to_json()

    run.cached("probes", key, fit_probes, outputs=[run.path / "probes"])
    report = _Report(run.result("probes"))  # as stored (JSON keys), resumed or not
    metrics = {"generation": gen_summary, "cache": cache.info.get("summary", {}),
               "probes": report.data}
    run.write_metrics(metrics)
    best = report.layer(report.best_layer)
    run.write_report(
        f"# probe-layers: {cfg.model}\n\n"
        f"{len(cache)} thoughts from {gen_summary['n']} generated traces "
        f"(accuracy {gen_summary['accuracy']:.3f}); labels {cache.label_counts()}.\n\n"
        f"Best layer **{report.best_layer}**: 3-way accuracy "
        f"{best.get('accuracy_mean', float('nan')):.3f} vs shuffled-label control "
        f"{best.get('control_accuracy_mean', float('nan')):.3f}.\n\n"
        "![layer curve](probes/layer_curve.png)\n\nFull probe report: "
        "[probes/report.md](probes/report.md)\n")
    return run.path


class _Report:
    """The stored probe report (its JSON) with the accessors the report text needs."""

    def __init__(self, data: dict):
        self.data, self.best_layer = data, data["best_layer"]

    def layer(self, layer: int) -> dict:
        return next(r for r in self.data["layers"] if r["layer"] == layer)
