"""Linear probes per layer: grouped, stratified k-fold CV of a standardised multinomial logistic
regression, with shuffled-label and majority-class controls.

The entry points live here; the parts are modules of their own: `probes.sources` (where
activations come from), `probes.tasks` (folds, the main task and the pairs), `probes.fitters`
(the batched torch fitter and the scikit-learn reference), `probes.cv` (scoring every layer),
`probes.report` (`ProbeReport`, saving), `probes.maps` (2-D maps), `probes.synthetic`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lens_steer.cache import load_cache
from probes.cv import cross_validate
from probes.maps import embed_2d
from probes.report import ProbeReport, with_model_control
from probes.sources import Activations, CacheLayers, LayerSource
from probes.tasks import make_folds, make_tasks, note


def probe_layers(
    activations: Activations,
    labels: Sequence,
    groups: Sequence,
    *,
    layers: Sequence[int] | None = None,
    pairs: str | Sequence[tuple[Any, Any]] | None = "auto",
    n_folds: int = 5,
    C: float = 0.1,
    backend: str = "torch",
    max_iter: int = 100,
    control: bool = True,
    separability_stats: bool = True,
    silhouette_points: int = 2000,
    map_layers: Sequence[int] | str | None = "best",
    tsne: bool = True,
    max_map_points: int = 1500,
    control_activations: Activations | None = None,
    layer_batch: int = 1,
    num_threads: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ProbeReport:
    """Cross-validated linear probes for every layer.

    activations: {layer: [n, d]} (a lazy Mapping is fine: each layer is read once per pass) or a
        [layer, n, d] tensor (layers numbered 0.. unless `layers` names them).
    labels, groups: one per thought; labels are any hashable (str/int), groups the trace ids.
    pairs: "auto" (the SEAL pairs execution/reflection/transition whose labels are present),
        "all" (every pair of classes), None/[] (none) or a list of (label_a, label_b).
    C: inverse L2 strength, as scikit-learn's `LogisticRegression(C=...)` on z-scored features.
    backend: "torch" (batched L-BFGS, `max_iter` iterations) or "sklearn" (reference).
    control: also fit every probe on labels shuffled within each training fold and evaluated on
        the true test labels (chance level by construction); selectivity = real - control.
    map_layers: layers for the 2-D PCA (and t-SNE if `tsne`) maps: "best", a list, or None.
    layer_batch: layers per joint L-BFGS run (torch backend); num_threads: torch threads for the
        fit (None: torch's setting, or 1 for small problems, where extra threads only contend).
    control_activations: a second model's activations of the same thoughts (e.g. a random-weight
        model); probed with the same folds and recorded as `model_control_*`.
    A class with fewer thoughts than `n_folds` is dropped (ProbeWarning, recorded in the report).
    """
    t0 = time.perf_counter()
    source = LayerSource(activations, layers)
    n = source.n
    labels, groups = list(labels), list(groups)
    if n == 0 or len(labels) == 0:
        raise ValueError("empty dataset: no thoughts to probe; check that the cache holds "
                         "thoughts (and that the label filter did not remove them all)")
    if len(labels) != n or len(groups) != n:
        raise ValueError(f"length mismatch: {n} activation rows, {len(labels)} labels, "
                         f"{len(groups)} groups; pass one label and one group (trace id) per "
                         "thought row")
    if backend not in ("torch", "sklearn"):
        raise ValueError(f"backend must be 'torch' or 'sklearn', got {backend!r}")

    notes: list[str] = []
    all_classes = sorted(set(labels), key=lambda v: (str(type(v)), v))
    counts = {c: sum(1 for v in labels if v == c) for c in all_classes}
    if len(all_classes) < 2:
        raise ValueError(f"single class {all_classes!r}: a probe needs at least 2 distinct "
                         "labels; pass thoughts of several types")
    dropped = [c for c in all_classes if counts[c] < n_folds]
    for c in dropped:
        note(notes, f"class {c!r} has {counts[c]} thoughts, fewer than n_folds={n_folds}; "
                     "dropped from every task (collect more thoughts or lower n_folds)")
    classes = [c for c in all_classes if c not in dropped]
    if len(classes) < 2:
        raise ValueError(f"fewer than 2 classes have >= n_folds={n_folds} thoughts (counts: "
                         f"{ {str(k): v for k, v in counts.items()} }); lower n_folds or collect "
                         "more thoughts")
    keep = np.array([v in set(classes) for v in labels])
    idx_of = {c: i for i, c in enumerate(classes)}
    y = np.array([idx_of[v] for v, k in zip(labels, keep, strict=True) if k], dtype=np.int64)
    g = np.array([str(v) for v, k in zip(groups, keep, strict=True) if k])
    rows = np.flatnonzero(keep)
    n_groups = len(set(g))
    if n_groups < n_folds:
        raise ValueError(f"only {n_groups} traces (groups) for n_folds={n_folds}; grouped CV "
                         "needs at least one trace per fold: lower n_folds or add traces")

    tasks = make_tasks(classes, all_classes, dropped, pairs, notes)
    folds = make_folds(y, g, n_folds, seed)

    config = {"n_folds": n_folds, "C": C, "backend": backend, "max_iter": max_iter,
              "class_weight": "balanced", "standardise": "per fold, train statistics",
              "control": "labels shuffled within each training fold, true test labels",
              "cv": "StratifiedGroupKFold(shuffle=True) grouped by trace", "seed": seed,
              "source": source.description}
    per_layer = cross_validate(source, rows, y, tasks, folds, classes, C=C, fitter=backend,
                                max_iter=max_iter, control=control, layer_batch=layer_batch,
                                num_threads=num_threads,
                                separability_stats=separability_stats,
                                silhouette_points=silhouette_points, seed=seed,
                                progress=progress)
    t_cv = time.perf_counter() - t0
    report = ProbeReport(
        layers=per_layer,
        classes=[str(c) for c in classes],
        class_counts={str(c): counts[c] for c in all_classes},
        tasks={t.name: [str(classes[i]) for i in t.classes] for t in tasks},
        config=config,
        n_thoughts=len(y),
        n_groups=n_groups,
        dropped_classes=[{"class": str(c), "count": counts[c],
                          "reason": f"fewer than n_folds={n_folds} thoughts"} for c in dropped],
        warnings=notes,
        timings={"cross_validation_s": round(t_cv, 3)},
    )

    if control_activations is not None:
        csource = LayerSource(control_activations, layers)
        if csource.n != n:
            raise ValueError(f"control activations have {csource.n} rows, expected {n} (the "
                             "same thoughts as the probed activations)")
        crows = cross_validate(csource, rows, y, tasks, folds, classes, C=C, fitter=backend,
                                max_iter=max_iter, control=False, layer_batch=layer_batch,
                                num_threads=num_threads,
                                separability_stats=False, silhouette_points=0, seed=seed,
                                progress=progress)
        cfg = dict(config, source=csource.description)
        with_model_control(report, ProbeReport(layers=crows, classes=report.classes,
                                               class_counts=report.class_counts,
                                               tasks=report.tasks, config=cfg,
                                               n_thoughts=len(y), n_groups=n_groups))

    if map_layers:
        t1 = time.perf_counter()
        chosen = [report.best_layer] if map_layers == "best" else list(map_layers)
        for layer in chosen:
            report.maps[layer] = embed_2d(source.get(layer)[rows], y, classes, tsne=tsne,
                                          max_points=max_map_points, seed=seed)
        report.timings["maps_s"] = round(time.perf_counter() - t1, 3)
    return report


def probe_cache(cache, *, out_dir: str | Path | None = None, control_cache=None,
                plots: bool = True, **kwargs) -> ProbeReport:
    """One call: probe every layer of a thought cache (a `ThoughtCache` or its directory) on its
    labels, grouped by trace; with `control_cache` (same thoughts, e.g. a random-weight model of
    the same architecture) recorded as the model control; saved to `out_dir` when given.
    `kwargs` go to `probe_layers`."""
    cache = load_cache(cache) if isinstance(cache, str | Path) else cache
    control = None
    if control_cache is not None:
        control_cache = (load_cache(control_cache) if isinstance(control_cache, str | Path)
                         else control_cache)
        if list(control_cache.labels) != list(cache.labels) or \
                list(map(str, control_cache.groups)) != list(map(str, cache.groups)):
            raise ValueError("the control cache holds different thoughts (labels or trace ids "
                             "differ); cache the same traces with the control model")
        control = CacheLayers(control_cache)
    report = probe_layers(CacheLayers(cache), cache.labels, cache.groups,
                          control_activations=control, **kwargs)
    report.config["cache"] = {k: v for k, v in dict(cache.info).items() if k != "summary"}
    if out_dir is not None:
        report.save(out_dir, plots=plots)
    return report
