"""Folds and tasks shared by every layer: grouped, stratified folds, the main task and the pairs.

Folds come from `StratifiedGroupKFold` on the kept labels, grouped by trace (no trace has
thoughts on both sides of a split), and are shared by all tasks and layers, so layer curves and
controls are compared on identical splits. A `TaskFold` is one task's rows and targets in one
fold, with the shuffled-label control's targets beside the real ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from lens_steer.thoughts import LABELS

MAIN_TASK = "all"


class ProbeWarning(UserWarning):
    """A class or pair was dropped, or a setting was adjusted, so the report differs from what
    was asked; the same text is recorded in `ProbeReport.warnings`."""


@dataclass(frozen=True)
class Task:
    """A classification task: a subset of the kept classes (indices into `classes`)."""
    name: str
    classes: tuple[int, ...]


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
    for i, a in enumerate(LABELS):
        for b in LABELS[i + 1:]:
            if a in names and b in names:
                out.append((names[a], names[b]))
    return out


def make_tasks(classes: Sequence, all_classes: Sequence, dropped: Sequence,
               pairs: str | Sequence[tuple[Any, Any]] | None, notes: list[str]) -> list[Task]:
    """The main task (every kept class) and the pairs asked for ("auto": SEAL's pairs present,
    "all", None, or a list); a pair with a dropped or absent label is skipped with a note."""
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
            note(notes, f"pair {name} skipped: label(s) {missing!r} "
                         f"{'dropped (too few thoughts)' if set(missing) <= set(dropped) else 'absent'}")
            continue
        tasks.append(Task(name, (idx_of[a], idx_of[b])))
    return tasks


def note(notes: list[str], msg: str) -> None:
    """Record `msg` in the report's notes and warn with it (`ProbeWarning`)."""
    notes.append(msg)
    warnings.warn(msg, ProbeWarning, stacklevel=3)


@dataclass
class TaskFold:
    k: int
    train: np.ndarray  # fold-local train row indices in the task
    test: np.ndarray  # fold-local test row indices in the task
    y_train: dict[str, np.ndarray]  # variant -> local class index targets
    y_test: np.ndarray


def fold_plan(tr: np.ndarray, te: np.ndarray, y: np.ndarray, tasks: Sequence[Task],
              variants: Sequence[str], seed: int, fold: int) -> list[TaskFold]:
    """Each task's rows and targets in one fold; the "control" variant's training labels are
    shuffled with a seed fixed by (seed, fold, task)."""
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
        out.append(TaskFold(len(task.classes), t_train, t_test, targets,
                             np.array([local[c] for c in yte[mte]], dtype=np.int64)))
    return out
