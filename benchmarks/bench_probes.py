"""Linear probes per layer: time for all layers of a realistic cache, and agreement of the batched
torch backend with scikit-learn.

Full size (the issue's target): 10,000 thoughts x d_model 1,536 x 28 layers, 5 grouped folds,
synthetic activations (`probes.synthetic_thoughts`: anisotropic noise with a few huge dimensions,
per-trace offsets, 60/25/15 % execution/reflection/transition, 20 thoughts per trace, a weak
planted class signal in layers 10-19).
"""

from __future__ import annotations

import os
import time

from probes import probe_layers, synthetic_thoughts

# One torch thread: on the shared 2-core machine this was measured ~1.7x faster than two (the
# two OpenMP threads wait on each other whenever another process takes a core).
THREADS = 1

AGREE_KEYS = ("accuracy_mean", "balanced_accuracy_mean", "macro_f1_mean", "auroc_mean",
              "control_accuracy_mean")


def run(quick: bool = False) -> str:
    n, d, n_layers = (2000, 256, 6) if quick else (10_000, 1536, 28)
    signal = range(2, 4) if quick else range(10, 20)
    strength = 0.12 if quick else 0.05
    t0 = time.perf_counter()
    x, labels, groups = synthetic_thoughts(n, d, n_layers, signal_layers=signal,
                                           strength=strength, seed=0)
    t_gen = time.perf_counter() - t0
    common = dict(n_folds=5, map_layers=None, progress=False, seed=0, num_threads=THREADS)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    # (A) the core: 3-way probe + shuffled-label control, every layer, 5 folds.
    t0 = time.perf_counter()
    core = probe_layers(x, labels, groups, pairs=None, separability_stats=False, **common)
    t_core = time.perf_counter() - t0

    # (B) everything `lens-steer probe` computes except the 2-D maps: + the 3 SEAL pairs (each
    # with its control), Fisher ratio, silhouette (2,000 points), class-mean distances.
    t0 = time.perf_counter()
    full = probe_layers(x, labels, groups, **common)
    t_full = time.perf_counter() - t0

    # (C) scikit-learn reference on two layers (one noise, one signal) with the same folds.
    cmp_layers = [0, signal[0]]
    t0 = time.perf_counter()
    ref = probe_layers({i: x[i] for i in cmp_layers}, labels, groups, backend="sklearn",
                       pairs=None, separability_stats=False, **common)
    t_ref = time.perf_counter() - t0
    diffs = {k: max(abs(core.layer(i)[k] - ref.layer(i)[k]) for i in cmp_layers)
             for k in AGREE_KEYS}
    per_layer_fold_sk = t_ref / (len(cmp_layers) * 5)
    per_layer_fold_torch = t_core / (n_layers * 5)

    best = core.layer(core.best_layer)
    rows = [
        "| what was timed | wall time (s) |",
        "|---|---|",
        f"| (A) 3-way probe + shuffled-label control, {n_layers} layers x 5 folds "
        f"(torch backend, L-BFGS {core.config['max_iter']} iterations) | **{t_core:.1f}** |",
        f"| (B) (A) + 3 SEAL pair probes with their controls + Fisher ratio, silhouette, "
        f"class-mean distances (no 2-D maps) | {t_full:.1f} |",
        f"| (C) scikit-learn backend, 3-way + control, {len(cmp_layers)} layers x 5 folds "
        f"| {t_ref:.1f} |",
        f"| generating the synthetic activations (not part of the probe) | {t_gen:.1f} |",
    ]
    agree = ["| metric (3-way) | max abs difference torch vs sklearn over layers "
             f"{cmp_layers} |", "|---|---|"]
    agree += [f"| {k} | {v:.4f} |" for k, v in diffs.items()]
    return "\n".join([
        f"{n:,} thoughts x d_model {d:,} x {n_layers} layers, 5-fold CV grouped by trace "
        f"({len(set(groups))} traces), C=0.1, balanced class weights, float32, "
        f"{THREADS} torch thread for the fits; 1-min load average at start {load:.1f} "
        "(the CPU is shared, so times are upper bounds).",
        "",
        *rows,
        "",
        f"Per layer x fold: torch {per_layer_fold_torch:.2f} s (both probes, all folds of a "
        f"layer fitted jointly) vs scikit-learn {per_layer_fold_sk:.2f} s "
        f"(~{per_layer_fold_sk / max(per_layer_fold_torch, 1e-9):.0f}x).",
        "",
        *agree,
        "",
        f"Sanity: best layer {core.best_layer} (planted signal in layers {signal.start}-"
        f"{signal.stop - 1}): accuracy {best['accuracy_mean']:.3f} ± {best['accuracy_std']:.3f},"
        f" balanced {best['balanced_accuracy_mean']:.3f}, control accuracy "
        f"{best['control_accuracy_mean']:.3f}, majority {best['majority_accuracy_mean']:.3f}; "
        f"layer 0 balanced accuracy {core.layer(0)['balanced_accuracy_mean']:.3f}. "
        f"(B) best layer {full.best_layer}.",
    ])
