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

from experiments.common import (
    StudyConfig,
    generate_traces,
    load_study_model,
    register_study,
    split_problems,
)
from experiments.run_folder import RunFolder
from lens_steer.io import read_jsonl


@dataclasses.dataclass
class ProbeLayersConfig(StudyConfig):
    n_folds: int = 5
    """Cross-validation folds (grouped by trace)."""
    probe_C: float = 0.1
    """Inverse L2 strength of the logistic-regression probe."""
    random_control: bool = False
    """Also probe a random-weight model of the same architecture on the same thoughts."""
    tsne: bool = True
    """Draw t-SNE maps next to PCA for the best layer."""


def register(sub: argparse._SubParsersAction) -> None:
    register_study(sub, "probe-layers", "generate traces, cache thoughts, probe every layer", ProbeLayersConfig, run_probe_layers)


def cache_from_traces(model, traces: list[dict], run: RunFolder, name: str = "cache"):
    """Cache every layer at thought positions into `run/<name>` (resumes if interrupted)."""
    from lens_steer.cache import CacheConfig, cache_thoughts, load_cache

    out = run.path / name
    cache_thoughts(model, traces, out, CacheConfig(layers=None, batch_size=16))
    return load_cache(out)


def random_weight_copy(model) -> Path:
    """Save a random-initialised model with `model`'s config and tokenizer to a temp dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src = model.source
    out = Path(tempfile.mkdtemp(prefix="lens-steer-random-"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(out)
    model.tokenizer.save_pretrained(out)
    return out


def run_probe_layers(cfg: ProbeLayersConfig, out: Path, model=None) -> Path:
    from lens_steer import load_model
    from probes import probe_layers

    run = RunFolder(out, cfg)
    model = model or load_study_model(cfg)
    problems, _ = split_problems(cfg)
    traces, gen_summary = generate_traces(model, problems, cfg, run, "traces")
    run.write_records(read_jsonl(run.path / "traces_records.jsonl"))
    cache = cache_from_traces(model, traces, run)
    control = None
    if cfg.random_control:
        rand = load_model(random_weight_copy(model), backend=cfg.backend)
        control = cache_from_traces(rand, traces, run, "cache_random").to_dict()
    report = probe_layers(cache.to_dict(), cache.labels, cache.groups, n_folds=cfg.n_folds,
                          C=cfg.probe_C, tsne=cfg.tsne, control_activations=control,
                          seed=cfg.seed)
    report.save(run.path / "probes")
    metrics = {"generation": gen_summary, "cache": cache.info.get("summary", {}),
               "probes": report.to_json()}
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
