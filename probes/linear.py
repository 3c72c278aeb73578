"""Linear probes per layer: grouped, stratified k-fold CV of a standardised multinomial logistic
regression, with shuffled-label and majority-class controls.

Two backends fit the same model, `StandardScaler -> LogisticRegression(C, class_weight=
"balanced")` (L2, unpenalised intercept; binary tasks use one logit like scikit-learn):

- `"torch"` (default): for each layer (or chunk of `layer_batch` layers), every fold, every
  task (3-way and pairs) and its shuffled control are fitted *at once* as one block-separable
  objective with full-batch L-BFGS in float32. Each fold's test rows get weight 0 and
  standardisation is folded into the weights (logits = x @ (W / sd) + b - (mu / sd) @ W), so one
  pass over the raw activations serves all folds and tasks, each with its own train statistics.
  One layer per L-BFGS run is the default: measured faster than stacking layers, whose joint
  line search needs more evaluations.
- `"sklearn"`: the reference, one `Pipeline` per layer x task x fold (slow; for checking).

Folds come from `StratifiedGroupKFold` on the kept labels, grouped by trace (no trace has
thoughts on both sides of a split), and are shared by all tasks and layers, so layer curves and
controls are compared on identical splits.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from sklearn.model_selection import StratifiedGroupKFold
from tqdm.auto import tqdm

from probes.metrics import (
    METRICS,
    SEAL_LABELS,
    fold_confusion,
    fold_metrics,
    majority_metrics,
    separability,
    summarise,
)

Activations = Mapping[int, Float[torch.Tensor, "n d"]] | Float[torch.Tensor, "layer n d"]

MAIN_TASK = "all"


class ProbeWarning(UserWarning):
    """A class or pair was dropped, or a setting was adjusted, so the report differs from what
    was asked; the same text is recorded in `ProbeReport.warnings`."""


@dataclass(frozen=True)
class Task:
    """A classification task: a subset of the kept classes (indices into `classes`)."""
    name: str
    classes: tuple[int, ...]


# --------------------------------------------------------------------------- report


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
        from lens_steer.io import write_json, write_text
        from probes.plots import render_report_md, save_plots

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


# --------------------------------------------------------------------------- entry point


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
    import time
    t0 = time.perf_counter()
    source = _LayerSource(activations, layers)
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
        _note(notes, f"class {c!r} has {counts[c]} thoughts, fewer than n_folds={n_folds}; "
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

    tasks = _make_tasks(classes, all_classes, dropped, pairs, notes)
    folds = make_folds(y, g, n_folds, seed)

    config = {"n_folds": n_folds, "C": C, "backend": backend, "max_iter": max_iter,
              "class_weight": "balanced", "standardise": "per fold, train statistics",
              "control": "labels shuffled within each training fold, true test labels",
              "cv": "StratifiedGroupKFold(shuffle=True) grouped by trace", "seed": seed,
              "source": source.description}
    per_layer = _cross_validate(source, rows, y, tasks, folds, classes, C=C, backend=backend,
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
        csource = _LayerSource(control_activations, layers)
        if csource.n != n:
            raise ValueError(f"control activations have {csource.n} rows, expected {n} (the "
                             "same thoughts as the probed activations)")
        crows = _cross_validate(csource, rows, y, tasks, folds, classes, C=C, backend=backend,
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


class CacheLayers(Mapping):
    """A `ThoughtCache` as a lazy {layer: activations} mapping (each layer read on access)."""

    def __init__(self, cache):
        self.cache = cache
        self.description = f"cache {getattr(cache, 'out_dir', cache)!s}"

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self.cache.layers:
            raise KeyError(layer)
        return self.cache.activations(layer)

    def __iter__(self):
        return iter(self.cache.layers)

    def __len__(self) -> int:
        return len(self.cache.layers)


def probe_cache(cache, *, out_dir: str | Path | None = None, control_cache=None,
                plots: bool = True, **kwargs) -> ProbeReport:
    """One call: probe every layer of a thought cache (a `ThoughtCache` or its directory) on its
    labels, grouped by trace; with `control_cache` (same thoughts, e.g. a random-weight model of
    the same architecture) recorded as the model control; saved to `out_dir` when given.
    `kwargs` go to `probe_layers`."""
    from lens_steer.cache import load_cache

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


# --------------------------------------------------------------------------- folds and tasks


def make_folds(y: np.ndarray, groups: np.ndarray, n_folds: int,
               seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Grouped, stratified folds (`StratifiedGroupKFold`, shuffled with `seed`). Every test
    fold is non-empty and no group appears on both sides of a split."""
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "least populated class has only k members" -- stratification is best-effort here.
        warnings.simplefilter("ignore", UserWarning)
        folds = [(tr, te) for tr, te in cv.split(np.zeros(len(y)), y, groups)]
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te]), "grouped split leaked a trace"
    return folds


def default_pairs(classes: Sequence) -> list[tuple]:
    """The SEAL pairs (execution/reflection/transition) whose labels are both present."""
    names = {str(c): c for c in classes}
    out = []
    for i, a in enumerate(SEAL_LABELS):
        for b in SEAL_LABELS[i + 1:]:
            if a in names and b in names:
                out.append((names[a], names[b]))
    return out


def _make_tasks(classes, all_classes, dropped, pairs, notes) -> list[Task]:
    idx_of = {c: i for i, c in enumerate(classes)}
    tasks = [Task(MAIN_TASK, tuple(range(len(classes))))]
    if pairs is None or (not isinstance(pairs, str) and len(pairs) == 0):
        return tasks
    if pairs == "auto":
        wanted = default_pairs(all_classes)
    elif pairs == "all":
        wanted = [(a, b) for i, a in enumerate(all_classes) for b in all_classes[i + 1:]]
    elif isinstance(pairs, str):
        raise ValueError(f"pairs must be 'auto', 'all', None or a list of (a, b); got {pairs!r}")
    else:
        wanted = [tuple(p) for p in pairs]
    if len(classes) == 2 and wanted:
        return tasks  # the main task already is the only pair
    by_str = {str(c): c for c in all_classes}
    for pair in wanted:
        if len(pair) != 2:
            raise ValueError(f"a pair needs two labels, got {pair!r}")
        a, b = (p if p in idx_of or p in dropped else by_str.get(str(p), p) for p in pair)
        name = f"{a}_vs_{b}"
        missing = [p for p in (a, b) if p not in idx_of]
        if missing:
            _note(notes, f"pair {name} skipped: label(s) {missing!r} "
                         f"{'dropped (too few thoughts)' if set(missing) <= set(dropped) else 'absent'}")
            continue
        tasks.append(Task(name, (idx_of[a], idx_of[b])))
    return tasks


def _note(notes: list[str], msg: str) -> None:
    notes.append(msg)
    warnings.warn(msg, ProbeWarning, stacklevel=3)


# --------------------------------------------------------------------------- activations


class _LayerSource:
    """Uniform, lazy access to per-layer activations from a dict, a Mapping or a 3-D tensor."""

    def __init__(self, activations: Activations, layers: Sequence[int] | None):
        if isinstance(activations, torch.Tensor):
            if activations.ndim != 3:
                raise ValueError(f"activations tensor must be [layer, n, d], got shape "
                                 f"{tuple(activations.shape)}")
            ids = list(layers) if layers is not None else list(range(activations.shape[0]))
            if len(ids) != activations.shape[0]:
                raise ValueError(f"{len(ids)} layer ids for {activations.shape[0]} layers")
            self._get: Callable[[int], torch.Tensor] = lambda i: activations[ids.index(i)]
            self.layers = ids
            self.description = f"tensor {tuple(activations.shape)}"
        elif isinstance(activations, Mapping):
            ids = list(layers) if layers is not None else sorted(activations.keys())
            missing = [i for i in ids if i not in activations]
            if missing:
                raise ValueError(f"layers {missing} not in activations (have "
                                 f"{sorted(activations.keys())})")
            self._get = lambda i: activations[i]
            self.layers = ids
            self.description = getattr(activations, "description", f"{len(ids)} layers")
        else:
            raise TypeError("activations must be a {layer: [n, d] tensor} mapping or a "
                            f"[layer, n, d] tensor, got {type(activations).__name__}")
        if not self.layers:
            raise ValueError("no layers to probe: activations are empty")
        first = self.get(self.layers[0])
        if first.ndim != 2:
            raise ValueError(f"layer {self.layers[0]} activations must be [n, d], got "
                             f"{tuple(first.shape)}")
        self.n, self.d = first.shape

    def get(self, layer: int) -> Float[torch.Tensor, "n d"]:
        x = torch.as_tensor(self._get(layer))
        if hasattr(self, "n") and tuple(x.shape) != (self.n, self.d):
            raise ValueError(f"layer {layer} has shape {tuple(x.shape)}, expected "
                             f"{(self.n, self.d)}")
        return x.detach().float()


# --------------------------------------------------------------------------- cross-validation


def _cross_validate(source, rows, y, tasks, folds, classes, *, C, backend, max_iter, control,
                    layer_batch, num_threads, separability_stats, silhouette_points, seed,
                    progress) -> list[dict]:
    layer_batch = max(1, int(layer_batch))
    variants = ("real", "control") if control else ("real",)
    # Per fold, per task: train/test rows (fold-local) and targets per variant.
    plan = [_fold_plan(tr, te, y, tasks, variants, seed, f) for f, (tr, te) in enumerate(folds)]

    # The majority-class baseline does not depend on the layer: once per task.
    majority = []
    for ti in range(len(tasks)):
        maj = [majority_metrics(p[ti].y_train["real"], p[ti].y_test, p[ti].k) for p in plan
               if len(p[ti].test)]
        majority.append({f"majority_{k_}": v for k_, v in summarise(maj).items()
                         if k_.endswith("_mean")})
    results: dict[int, dict] = {}
    layer_ids = list(source.layers)
    bar = tqdm(total=len(layer_ids) * len(folds), desc=f"probe ({backend})", unit="layer-fold",
               disable=not progress, leave=False)
    for start in range(0, len(layer_ids), layer_batch):
        chunk = layer_ids[start:start + layer_batch]
        x = torch.stack([source.get(layer)[rows] for layer in chunk])  # [L, n, d]
        # fold -> task -> variant -> probs [L, n_test, k]
        if backend == "torch":
            fold_out = _fit_predict_torch(x, folds, plan, C, max_iter, num_threads)
            bar.update(len(chunk) * len(folds))
        else:
            fold_out = []
            for f, (tr, te) in enumerate(folds):
                fold_out.append(_fit_predict_sklearn(x[:, tr], x[:, te], plan[f], C,
                                                     max(max_iter, 1000)))
                bar.update(len(chunk))
        for li, layer in enumerate(chunk):
            row = {"layer": layer}
            for ti, task in enumerate(tasks):
                row_t = _task_metrics(task, plan, fold_out, li, ti, classes, control)
                row_t.update(majority[ti])
                if task.name == MAIN_TASK:
                    row.update(row_t)
                else:
                    row.setdefault("pairs", {})[task.name] = row_t
            if separability_stats:
                row.update(separability(x[li], y, classes, silhouette_points=silhouette_points,
                                        seed=seed))
            results[layer] = row
        del x
    bar.close()
    return [results[layer] for layer in layer_ids]


@dataclass
class _TaskFold:
    k: int
    train: np.ndarray  # fold-local train row indices in the task
    test: np.ndarray  # fold-local test row indices in the task
    y_train: dict[str, np.ndarray]  # variant -> local class index targets
    y_test: np.ndarray


def _fold_plan(tr, te, y, tasks, variants, seed, fold) -> list[_TaskFold]:
    out = []
    for ti, task in enumerate(tasks):
        local = {c: i for i, c in enumerate(task.classes)}
        ytr, yte = y[tr], y[te]
        mtr, mte = np.isin(ytr, task.classes), np.isin(yte, task.classes)
        t_train, t_test = np.flatnonzero(mtr), np.flatnonzero(mte)
        real = np.array([local[c] for c in ytr[mtr]], dtype=np.int64)
        targets = {"real": real}
        if "control" in variants:
            rng = np.random.default_rng([seed, fold, ti])
            targets["control"] = rng.permutation(real)
        out.append(_TaskFold(len(task.classes), t_train, t_test, targets,
                             np.array([local[c] for c in yte[mte]], dtype=np.int64)))
    return out


def _task_metrics(task, plan, fold_out, li, ti, classes, control) -> dict:
    k = len(task.classes)
    real, ctrl = [], []
    cm = np.zeros((k, k), dtype=np.int64)
    for f, fplan in enumerate(plan):
        tf = fplan[ti]
        if len(tf.test) == 0:
            continue
        probs = fold_out[f][ti]
        p = probs["real"][li]
        real.append(fold_metrics(tf.y_test, p, k))
        cm += fold_confusion(tf.y_test, p.argmax(1), k)
        if control:
            ctrl.append(fold_metrics(tf.y_test, probs["control"][li], k))
    row: dict[str, Any] = {"n": int(sum(len(p[ti].test) for p in plan)), "n_classes": k,
                           "chance": 1.0 / k}
    row.update(summarise(real))
    if control:
        row.update(summarise(ctrl, "control_"))
        row["selectivity"] = row["accuracy_mean"] - row["control_accuracy_mean"]
        row["selectivity_balanced"] = (row["balanced_accuracy_mean"]
                                       - row["control_balanced_accuracy_mean"])
    row["fold_accuracy"] = [m["accuracy"] for m in real]
    row["confusion_matrix"] = cm.tolist()
    row["confusion_labels"] = [str(classes[i]) for i in task.classes]
    return row


# --------------------------------------------------------------------------- torch backend


def _fit_predict_torch(x: Float[torch.Tensor, "L n d"], folds, plans: list[list[_TaskFold]],
                       C: float, max_iter: int, num_threads: int | None = None
                       ) -> list[list[dict]]:
    """Fit every (fold, task, variant) probe for every layer of the chunk jointly on the full
    activations (each fold's test rows get weight 0), so one pass over `x` serves all folds;
    return probabilities on each task's test rows: [fold][task][variant] -> [L, n_test, k]."""
    prev = torch.get_num_threads()
    small = x.numel() < 2e6  # per-op overhead dominates; extra threads only contend
    torch.set_num_threads(num_threads or (1 if small else prev))
    try:
        return _fit_predict_torch_impl(x, folds, plans, C, max_iter)
    finally:
        torch.set_num_threads(prev)


def _fit_predict_torch_impl(x, folds, plans, C, max_iter):
    L, m, d = x.shape
    # One problem group per (fold, task): its train rows define the z-scoring statistics.
    groups = [(f, t) for f in range(len(folds)) for t in range(len(plans[f]))]
    G = len(groups)
    mask = torch.zeros(m, G)
    train_rows = {}
    for gi, (f, t) in enumerate(groups):
        train_rows[f, t] = torch.as_tensor(folds[f][0][plans[f][t].train])
        mask[train_rows[f, t], gi] = 1.0
    cnt = mask.sum(0).clamp_min(1)  # [G]
    center = x.mean(1, keepdim=True)  # [L, 1, d]: for a numerically stable variance
    s1 = torch.zeros(L, G, d)
    s2 = torch.zeros(L, G, d)
    for r in range(0, m, 2048):
        xc = x[:, r:r + 2048] - center
        mk = mask[r:r + 2048].T.expand(L, G, -1)
        s1 += torch.bmm(mk, xc)
        s2 += torch.bmm(mk, xc * xc)
    mean_c = s1 / cnt[None, :, None]
    var = (s2 / cnt[None, :, None] - mean_c ** 2).clamp_min(0)
    sd = var.sqrt()
    sd = torch.where(sd > 1e-6 * (1 + center.abs()), sd, torch.ones_like(sd))  # constant dims
    mu = mean_c + center  # [L, G, d]

    # Problems: (fold, task, variant), each with its own columns (binary: one logit, like
    # scikit-learn). All log-softmaxes run as one op over a padded [L, m, P, k_max] view of the
    # logits: extra columns ZERO (the fixed logit of a binary task) and PAD (-inf-like).
    spec = [(gi, v) for gi, (f, t) in enumerate(groups) for v in plans[f][t].y_train]
    ks = [plans[groups[gi][0]][groups[gi][1]].k for gi, _ in spec]
    P, kmax = len(spec), max(ks)
    ctot = sum(k if k > 2 else 1 for k in ks)
    ZERO, PAD = ctot, ctot + 1
    gather_idx = torch.full((P, kmax), PAD, dtype=torch.long)
    target = torch.zeros(m, P, dtype=torch.long)
    weight = torch.zeros(m, P)
    col_group, col_prob = [], []
    col = 0
    for p, (gi, v) in enumerate(spec):
        f, t = groups[gi]
        tf = plans[f][t]
        tgt = tf.y_train[v]
        ncol = tf.k if tf.k > 2 else 1
        cols = list(range(col, col + ncol))
        gather_idx[p, :tf.k] = torch.as_tensor(cols if tf.k > 2 else [ZERO] + cols)
        rows_t = train_rows[f, t]
        target[rows_t, p] = torch.as_tensor(tgt)
        bc = np.bincount(tgt, minlength=tf.k).astype(np.float64)
        cw = len(tgt) / (tf.k * np.maximum(bc, 1))  # class_weight="balanced"
        weight[rows_t, p] = torch.as_tensor(cw[tgt], dtype=torch.float32)
        col_group += [gi] * ncol
        col_prob += [p] * ncol
        col += ncol
    wsum = weight.sum(0).clamp_min(1e-12)  # [P]
    weight = weight / wsum  # each problem's loss is its weighted mean NLL, like sklearn's
    l2 = (1.0 / (2 * C * wsum))[torch.as_tensor(col_prob)]  # [ctot]
    ct = torch.as_tensor(col_group)
    sd_cols = sd[:, ct, :].transpose(1, 2).contiguous()  # [L, d, ctot]
    musd_cols = (mu[:, ct, :] / sd[:, ct, :]).transpose(1, 2).contiguous()

    W = torch.zeros(L, d, ctot, requires_grad=True)
    b = torch.zeros(L, ctot, requires_grad=True)

    def log_probs(x, Wv, bv):
        V = Wv / sd_cols
        off = bv - (musd_cols * Wv).sum(1)
        z = torch.baddbmm(off[:, None, :], x, V)  # [L, rows, ctot]
        extra = z.new_tensor([0.0, -1e9]).expand(*z.shape[:2], 2)
        z = torch.cat([z, extra], -1)[..., gather_idx]  # [L, rows, P, kmax]
        return torch.log_softmax(z, -1)

    def closure():
        opt.zero_grad()
        lp = log_probs(x, W, b)
        nll = -lp.gather(-1, target.expand(L, m, P)[..., None]).squeeze(-1)  # [L, m, P]
        total = (nll * weight).sum() + ((W ** 2).sum(1) * l2).sum()
        total.backward()
        return total

    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")
    opt.step(closure)

    out: list[list[dict]] = [[dict() for _ in plan] for plan in plans]
    with torch.no_grad():
        probs = log_probs(x, W, b).exp()  # [L, m, P, kmax]
        for p, (gi, v) in enumerate(spec):
            f, t = groups[gi]
            te = torch.as_tensor(folds[f][1][plans[f][t].test])
            out[f][t][v] = probs[:, te, p, :ks[p]].numpy()
    return out


# --------------------------------------------------------------------------- sklearn backend


def _fit_predict_sklearn(xtr, xte, plan: list[_TaskFold], C: float, max_iter: int) -> list[dict]:
    """Reference: StandardScaler + LogisticRegression(class_weight="balanced") per probe."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    L = xtr.shape[0]
    out: list[dict] = [dict() for _ in plan]
    for t, tf in enumerate(plan):
        for v, tgt in tf.y_train.items():
            res = np.zeros((L, len(tf.test), tf.k))
            for li in range(L):
                a = xtr[li][torch.as_tensor(tf.train)].numpy()
                clf = make_pipeline(StandardScaler(), LogisticRegression(
                    C=C, class_weight="balanced", max_iter=max_iter))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # ConvergenceWarning on separable data
                    clf.fit(a, tgt)
                p = clf.predict_proba(xte[li][torch.as_tensor(tf.test)].numpy())
                res[li][:, clf.classes_] = p  # a class absent from training gets 0
            out[t][v] = res
    return out


# --------------------------------------------------------------------------- 2-D maps


def embed_2d(x: Float[torch.Tensor, "n d"], y: np.ndarray, classes: Sequence, *,
             tsne: bool = True, max_points: int = 1500, seed: int = 0) -> dict:
    """PCA (and t-SNE) 2-D coordinates of a seeded subsample of standardised activations."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    idx = np.arange(len(y))
    if len(idx) > max_points:
        idx = np.sort(rng.choice(len(y), max_points, replace=False))
    a = x[idx].float()
    sd = a.std(0)
    a = ((a - a.mean(0)) / torch.where(sd > 0, sd, torch.ones_like(sd))).numpy()
    ncomp = min(50, a.shape[0], a.shape[1])
    pca = PCA(n_components=ncomp, random_state=seed).fit(a)
    proj = pca.transform(a)
    out = {"pca": proj[:, :2], "explained_variance": pca.explained_variance_ratio_[:2].tolist(),
           "labels": [str(classes[i]) for i in y[idx]], "tsne": None}
    if tsne and len(idx) >= 5:
        perplexity = float(min(30.0, (len(idx) - 1) / 3))
        out["tsne"] = TSNE(n_components=2, init="pca", perplexity=perplexity,
                           random_state=seed).fit_transform(proj)
    return out


# --------------------------------------------------------------------------- json


def _json_safe(obj):
    """NaN/inf -> None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------- synthetic data


def synthetic_thoughts(n: int = 1000, d: int = 64, n_layers: int = 4, *,
                       signal_layers: Sequence[int] = (2,), strength: float = 1.0,
                       thoughts_per_trace: int = 20,
                       proportions: Sequence[float] = (0.6, 0.25, 0.15),
                       classes: Sequence = ("execution", "reflection", "transition"),
                       seed: int = 0):
    """Activations with planted linear class structure in `signal_layers` (class-mean shifts of
    norm ~`strength` x noise scale along random directions) and none elsewhere; anisotropic
    noise with a few large-magnitude dimensions and a per-trace offset, like LM residuals.
    Returns (activations [layer, n, d], labels, groups)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    labels = list(rng.choice(np.array(classes, dtype=object), size=n, p=list(proportions)))
    groups = [f"trace{i // thoughts_per_trace}" for i in range(n)]
    y = torch.as_tensor([list(classes).index(v) for v in labels])
    scale = torch.linspace(0.2, 2.0, d)[torch.randperm(d, generator=g)]
    scale[torch.randperm(d, generator=g)[:3]] = 30.0  # "massive activation" dims
    n_tr = (n + thoughts_per_trace - 1) // thoughts_per_trace
    x = torch.empty(n_layers, n, d)
    for layer in range(n_layers):
        trace_off = 0.5 * torch.randn(n_tr, d, generator=g)[torch.arange(n) // thoughts_per_trace]
        x[layer] = (torch.randn(n, d, generator=g) + trace_off) * scale + 5.0
        if layer in signal_layers:
            dirs = torch.randn(len(classes), d, generator=g) / math.sqrt(d)
            x[layer] += strength * math.sqrt(d) * dirs[y] * scale.clamp(max=2.0)
    return x, labels, groups
