"""Linear probes per layer: how separable are execution, reflection and transition thoughts?

    report = probe_layers({layer: acts}, labels, groups)   # grouped, stratified k-fold CV
    report.best_layer, report.layer(12)["accuracy_mean"]
    report.save("runs/probe")                              # metrics.json, PNGs, report.md
    probe_cache("runs/cache", out_dir="runs/probe")        # the same from a thought cache
"""

from probes.linear import (
    CacheLayers,
    ProbeReport,
    ProbeWarning,
    Task,
    default_pairs,
    embed_2d,
    make_folds,
    probe_cache,
    probe_layers,
    synthetic_thoughts,
    with_model_control,
)
from probes.metrics import SEAL_LABELS, fold_metrics, seal_vector_norm, separability
from probes.plots import plot_confusions, plot_layer_curve, plot_map, save_plots

__all__ = [
    "probe_layers", "probe_cache", "ProbeReport", "ProbeWarning", "with_model_control",
    "CacheLayers", "Task", "make_folds", "default_pairs", "embed_2d", "synthetic_thoughts",
    "fold_metrics", "separability", "seal_vector_norm", "SEAL_LABELS", "plot_layer_curve",
    "plot_map", "plot_confusions", "save_plots",
]
