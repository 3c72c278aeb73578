"""Fold metrics, classifier-free separability statistics and class-mean distances.

Fold metrics use scikit-learn so the numbers mean what the literature means by them. The
separability statistics (Fisher ratio, silhouette) and class-mean distances need no classifier,
so they say how far apart the classes are independent of how well a probe was fitted; the SEAL
steering vector's norm, ||mean(execution) - mean(reflection U transition)||, is reported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sklearn
import torch
from jaxtyping import Float, Int
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
    silhouette_score,
)

from lens_steer.thoughts import LABELS

METRICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")

# SEAL's thought types: execution thoughts vs the "non-execution" (reflection, transition) ones.
EXECUTION, NON_EXECUTION = LABELS[0], LABELS[1:]


def fold_metrics(y_true: Int[np.ndarray, "n"], proba: Float[np.ndarray, "n k"],
                 n_classes: int, *, auroc: bool = True) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1 and one-vs-rest macro AUROC for one test fold.

    `y_true` holds class indices in [0, n_classes); `proba` the predicted class probabilities.
    AUROC is averaged over the classes present in the fold (a class absent from the fold has no
    ROC); NaN when fewer than two classes are present.
    """
    labels = np.arange(n_classes)
    pred = proba.argmax(1)
    # Inputs are validated here once; sklearn's per-call validation costs more than the metric.
    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        return {
            "accuracy": float(accuracy_score(y_true, pred)),
            "balanced_accuracy": float(_balanced_accuracy(y_true, pred)),
            "macro_f1": float(f1_score(y_true, pred, labels=labels, average="macro",
                                       zero_division=0)),
            "auroc": _auroc(y_true, proba, n_classes) if auroc else float("nan"),
        }


def fold_confusion(y_true: Int[np.ndarray, "n"], pred: Int[np.ndarray, "n"],
                   n_classes: int) -> Int[np.ndarray, "k k"]:
    """Confusion matrix (rows: true class, columns: predicted), in class-index order."""
    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        return confusion_matrix(y_true, pred, labels=np.arange(n_classes))


def majority_metrics(y_train: Int[np.ndarray, "m"], y_test: Int[np.ndarray, "n"],
                     n_classes: int) -> dict[str, float]:
    """Metrics of always predicting the training fold's most frequent class (AUROC = 0.5)."""
    majority = np.bincount(y_train, minlength=n_classes).argmax()
    proba = np.zeros((len(y_test), n_classes))
    proba[:, majority] = 1.0
    out = fold_metrics(y_test, proba, n_classes, auroc=False)
    out["auroc"] = 0.5
    return out


def summarise(folds: list[dict[str, float]], prefix: str = "") -> dict[str, float]:
    """Mean and standard deviation over folds of each metric (NaN-aware: a fold without a
    defined AUROC is skipped)."""
    out: dict[str, float] = {}
    for name in METRICS:
        vals = np.array([f[name] for f in folds], dtype=float)
        ok = vals[~np.isnan(vals)]
        out[f"{prefix}{name}_mean"] = float(ok.mean()) if len(ok) else float("nan")
        out[f"{prefix}{name}_std"] = float(ok.std()) if len(ok) else float("nan")
    return out


def _balanced_accuracy(y_true, pred) -> float:
    # sklearn warns when a predicted class is absent from y_true; the mean recall over the
    # classes present is exactly what we want, so silence it.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return balanced_accuracy_score(y_true, pred)


def _auroc(y_true, proba, n_classes: int) -> float:
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(y_true == 1, proba[:, 1]))
    # One-vs-rest per present class, macro-averaged (sklearn's multi_class="ovr" requires every
    # class in the fold, which grouped folds do not guarantee).
    return float(np.mean([roc_auc_score(y_true == k, proba[:, k]) for k in present]))


def seeded_subsample(n: int, max_points: int, seed: int) -> Int[np.ndarray, "k"]:
    """Sorted indices of at most `max_points` of `n` rows, drawn without replacement (`seed`)."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))

# --------------------------------------------------------------------------- separability


def separability(x: Float[torch.Tensor, "n d"], y: Int[np.ndarray, "n"], classes: Sequence,
                 *, silhouette_points: int = 2000, seed: int = 0) -> dict:
    """Classifier-free statistics of one layer.

    - `fisher_ratio`: tr(S_between) / tr(S_within) on standardised features (per-dimension
      z-scores, so a few huge-magnitude dimensions do not dominate).
    - `silhouette`: mean silhouette (Euclidean, standardised features) on a seeded subsample of
      at most `silhouette_points` thoughts (it is O(n^2 d)); 0 switches it off (NaN).
    - `class_mean_distances`: {"a|b": ||mean_a - mean_b||} in the raw activation space.
    - `mean_norm`: the mean activation norm, so distances can be read relative to it.
    - `seal_vector_norm`: ||mean(execution) - mean(reflection U transition)|| (raw space) when
      "execution" and at least one of the other two labels are present, else None.
    """
    x = x.float()
    yt = torch.as_tensor(y, dtype=torch.long)
    k = len(classes)
    counts = torch.bincount(yt, minlength=k).float()
    sums = torch.zeros(k, x.shape[1]).index_add_(0, yt, x)
    means = sums / counts.clamp_min(1)[:, None]

    mu, sd = x.mean(0), x.std(0, correction=0)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    z = (x - mu) / sd
    zmeans = (means - mu) / sd
    between = float((counts * ((zmeans) ** 2).sum(1)).sum())
    within = float(((z - zmeans[yt]) ** 2).sum())
    fisher = between / within if within > 0 else float("inf")

    sil = float("nan")
    if silhouette_points and len(np.unique(y)) >= 2:
        idx = seeded_subsample(len(y), silhouette_points, seed)
        if len(np.unique(y[idx])) >= 2:
            sil = float(silhouette_score(z[idx].numpy(), y[idx]))

    names = [str(c) for c in classes]
    dists = {f"{names[a]}|{names[b]}": float((means[a] - means[b]).norm())
             for a in range(k) for b in range(a + 1, k)}
    return {
        "fisher_ratio": fisher,
        "silhouette": sil,
        "class_mean_distances": dists,
        "mean_norm": float(x.norm(dim=1).mean()),
        "seal_vector_norm": seal_vector_norm(x, y, classes),
    }


def seal_vector_norm(x: Float[torch.Tensor, "n d"], y: Int[np.ndarray, "n"],
                     classes: Sequence) -> float | None:
    """||mean(execution) - mean(reflection U transition)||, or None without those labels."""
    names = [str(c) for c in classes]
    if EXECUTION not in names:
        return None
    other = [names.index(c) for c in NON_EXECUTION if c in names]
    if not other:
        return None
    ex = torch.as_tensor(y == names.index(EXECUTION))
    non = torch.as_tensor(np.isin(y, other))
    return float((x[ex].mean(0) - x[non].mean(0)).norm())
