"""Cross-validation of every layer: fit each (fold, task, variant) probe, score the test folds,
and summarise per layer with the majority-class baseline and the separability statistics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from probes.fitters import fit_predict_sklearn, fit_predict_torch
from probes.metrics import (
    fold_confusion,
    fold_metrics,
    majority_metrics,
    separability,
    summarise,
)
from probes.sources import LayerSource
from probes.tasks import MAIN_TASK, Task, TaskFold, fold_plan


def cross_validate(source: LayerSource, rows: np.ndarray, y: Int[np.ndarray, "n"],
                   tasks: Sequence[Task], folds: Sequence[tuple[np.ndarray, np.ndarray]],
                   classes: Sequence, *, C: float, fitter: str, max_iter: int, control: bool,
                   layer_batch: int, num_threads: int | None, separability_stats: bool,
                   silhouette_points: int, seed: int, progress: bool) -> list[dict]:
    """One JSON-ready row per layer of `source` (rows `rows`, labels `y`): every task's
    cross-validated metrics (pairs under "pairs"), controls, majority baseline, separability.
    `fitter`: "torch" (all folds and tasks of a layer in one L-BFGS run) or "sklearn"."""
    layer_batch = max(1, int(layer_batch))
    variants = ("real", "control") if control else ("real",)
    # Per fold, per task: train/test rows (fold-local) and targets per variant.
    plan = [fold_plan(tr, te, y, tasks, variants, seed, f) for f, (tr, te) in enumerate(folds)]

    # The majority-class baseline does not depend on the layer: once per task.
    majority = []
    for ti in range(len(tasks)):
        maj = [majority_metrics(p[ti].y_train["real"], p[ti].y_test, p[ti].k) for p in plan
               if len(p[ti].test)]
        majority.append({f"majority_{k_}": v for k_, v in summarise(maj).items()
                         if k_.endswith("_mean")})
    results: dict[int, dict] = {}
    layer_ids = list(source.layers)
    bar = tqdm(total=len(layer_ids) * len(folds), desc=f"probe ({fitter})", unit="layer-fold",
               disable=not progress, leave=False)
    for start in range(0, len(layer_ids), layer_batch):
        chunk = layer_ids[start:start + layer_batch]
        x = torch.stack([source.get(layer)[rows] for layer in chunk])  # [L, n, d]
        # fold -> task -> variant -> probs [L, n_test, k]
        if fitter == "torch":
            fold_out = fit_predict_torch(x, folds, plan, C, max_iter, num_threads)
            bar.update(len(chunk) * len(folds))
        else:
            fold_out = []
            for f, (tr, te) in enumerate(folds):
                fold_out.append(fit_predict_sklearn(x[:, tr], x[:, te], plan[f], C,
                                                     max(max_iter, 1000)))
                bar.update(len(chunk))
        for li, layer in enumerate(chunk):
            row = {"layer": layer}
            for ti, task in enumerate(tasks):
                row_t = task_metrics(task, plan, fold_out, li, ti, classes, control)
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


def task_metrics(task: Task, plan: list[list[TaskFold]], fold_out: list[list[dict]], li: int,
                 ti: int, classes: Sequence, control: bool) -> dict:
    """Metrics of task `ti` at chunk layer `li`, summarised over the folds, with the pooled
    confusion matrix."""
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
