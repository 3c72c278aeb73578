"""Linear probes per layer: how separable are execution, reflection and transition thoughts?

    report = probe_layers({layer: acts}, labels, groups)   # grouped, stratified k-fold CV
    report.best_layer, report.layer(12)["accuracy_mean"]
    report.save("runs/probe")                              # metrics.json, PNGs, report.md
    probe_cache("runs/cache", out_dir="runs/probe")        # the same from a thought cache
"""

from lens_steer.thoughts import LABELS as SEAL_LABELS
from probes.linear import probe_cache, probe_layers
from probes.maps import embed_2d
from probes.metrics import fold_metrics, seal_vector_norm, separability
from probes.plots import plot_confusions, plot_layer_curve, plot_map, save_plots
from probes.report import ProbeReport, with_model_control
from probes.sources import CacheLayers
from probes.synthetic import synthetic_thoughts
from probes.tasks import ProbeWarning, Task, default_pairs, make_folds

__all__ = [
    "probe_layers", "probe_cache", "ProbeReport", "ProbeWarning", "with_model_control",
    "CacheLayers", "Task", "make_folds", "default_pairs", "embed_2d", "synthetic_thoughts",
    "fold_metrics", "separability", "seal_vector_norm", "SEAL_LABELS", "plot_layer_curve",
    "plot_map", "plot_confusions", "save_plots",
]
