"""Per-problem records and run-level metrics: accuracy, token counts, thoughts per trace by type,
wall time and tokens/s, overall and split by correctness."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lens_steer.errors import DataError
from lens_steer.eval.datasets import Problem, answer_checker
from lens_steer.eval.grading import (
    Grading,
    default_grading,
    extract_prediction,
    grade,
    is_unfinished,
)
from lens_steer.thoughts import (
    LABELS,
    count_by_label,
    label_thought,
    resolve_labeler,
    split_thoughts,
)

__all__ = ["Record", "THOUGHT_TYPES", "score_generations", "summarize", "extract_prediction",
           "label_trace", "write_records", "read_records", "Grading"]

THOUGHT_TYPES: tuple[str, ...] = LABELS


@dataclass
class Record:
    """One problem's outcome; `to_dict` rows are what records.jsonl holds."""

    id: str
    question: str
    gold: str
    generated_text: str
    predicted: str | None
    correct: bool
    n_tokens: int
    thought_labels: list[str] | None = None
    """Label per thought of the trace (SEAL's rules unless another labeler was chosen)."""
    thought_counts: dict[str, int] = field(default_factory=dict)
    dataset: str = ""
    finish_reason: str | None = None
    finished: bool | None = None
    """False when the trace stopped at the token limit still thinking; None when unknown."""
    grading: dict[str, str] = field(default_factory=dict)
    """The `Grading` it was scored under: {"protocol": ..., "unfinished": ...}."""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Record:
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in row.items() if k in names}
        extra = {k: v for k, v in row.items() if k not in names}
        rec = cls(**known)
        rec.meta.update(extra)
        return rec


def label_trace(text: str, think_only: bool = True,
                labeler: str | Callable[[str], str] | None = label_thought) -> list[str]:
    """Labels of the thoughts in `text` (`labeler`: a name, `LabelRules` or callable; SEAL's
    rules by default)."""
    label = resolve_labeler(labeler)
    return [label(t) for t in split_thoughts(text, think_only=think_only)]


def _counts(labels: Sequence[str] | None) -> dict[str, int]:
    return {} if labels is None else count_by_label(labels)


def score_generations(problems: Sequence[Problem], texts: Sequence[str],
                      n_tokens: Sequence[int], dataset: str, *, style: str = "auto",
                      think_only: bool = True,
                      finish_reasons: Sequence[str] | None = None,
                      labeler: str | Callable[[str], str] | None = label_thought,
                      grading: Grading | str | None = None) -> list[Record]:
    """Extract, check and thought-label each generation, one Record per problem.

    `texts` are the generated continuations (prompt excluded), `n_tokens` their generated-token
    counts; `dataset` picks the checker (:func:`answer_checker`). `grading`: a `Grading`, a
    protocol name ("official" / "lenient"; unfinished traces wrong) or None (the dataset's
    default, `lens_steer.eval.grading.DATASET_PROTOCOL`).
    """
    if not (len(problems) == len(texts) == len(n_tokens)):
        raise ValueError(f"lengths differ: {len(problems)} problems, {len(texts)} texts, "
                         f"{len(n_tokens)} token counts; pass one of each per problem")
    if finish_reasons is not None and len(finish_reasons) != len(problems):
        raise ValueError("finish_reasons needs one entry per problem")
    if not isinstance(grading, Grading):
        grading = default_grading(dataset, grading)
    check = answer_checker(dataset)
    out = []
    for i, (p, text, nt) in enumerate(zip(problems, texts, n_tokens, strict=True)):
        reason = None if finish_reasons is None else finish_reasons[i]
        unfinished = is_unfinished(text, reason)
        pred, correct = grade(text, p.answer, check, grading.protocol, style)
        if unfinished and grading.unfinished == "wrong":
            correct = False
        labels = label_trace(text, think_only=think_only, labeler=labeler)
        out.append(Record(
            id=p.id, question=p.question, gold=p.answer, generated_text=text, predicted=pred,
            correct=correct, n_tokens=int(nt), thought_labels=labels,
            thought_counts=_counts(labels), dataset=p.source or dataset, finish_reason=reason,
            finished=None if unfinished is None else not unfinished,
            grading=grading.to_dict()))
    return out


def _get(r: Record | dict[str, Any], key: str) -> Any:
    return r.get(key) if isinstance(r, dict) else getattr(r, key)


def _group_stats(records: Sequence[Record | dict[str, Any]]) -> dict[str, Any]:
    tokens = [int(_get(r, "n_tokens")) for r in records]
    labelled = [r for r in records if _get(r, "thought_labels") is not None]
    per_trace: dict[str, float | None] = {}
    types = list(THOUGHT_TYPES) + sorted({k for r in labelled for k in _counts(
        _get(r, "thought_labels")) if k not in THOUGHT_TYPES})
    for k in types:
        per_trace[k] = (sum(_counts(_get(r, "thought_labels")).get(k, 0) for r in labelled)
                        / len(labelled)) if labelled else None
    per_trace["total"] = (sum(len(_get(r, "thought_labels")) for r in labelled)
                          / len(labelled)) if labelled else None
    return {"n": len(records),
            "mean_tokens": statistics.fmean(tokens) if tokens else None,
            "median_tokens": float(statistics.median(tokens)) if tokens else None,
            "thoughts_per_trace": per_trace,
            "reflection_transition_per_trace": (per_trace["reflection"] + per_trace["transition"]
                                                if labelled else None)}


def summarize(records: Sequence[Record | dict[str, Any]],
              wall_time_s: float | None = None) -> dict[str, Any]:
    """Run metrics from records (Record objects or their dicts, e.g. read back from JSONL).

    Keys: n, accuracy (unfinished traces count as the records' grading says: wrong by
    default), n_correct, n_no_answer, grading ({"protocol", "unfinished"}),
    accuracy_finished (over traces that did not stop at the limit while thinking),
    n_unfinished, unfinished_share, mean_tokens, median_tokens, total_tokens,
    thoughts_per_trace ({execution, reflection, transition, total} means per trace),
    reflection_transition_per_trace (SEAL's headline: the non-execution thoughts per trace),
    by_correctness ({"correct"|"incorrect": {n, mean_tokens, median_tokens,
    thoughts_per_trace, reflection_transition_per_trace}}), wall_time_s, tokens_per_s. Undefined values (empty sets, no wall
    time) are None, never NaN, so the dict stays valid JSON.
    """
    stats = _group_stats(records)
    finished = [r for r in records if _get(r, "finished") is not False]
    n_unfinished = len(records) - len(finished)
    gradings = {tuple(sorted((_get(r, "grading") or {}).items())) for r in records}
    correct = [r for r in records if _get(r, "correct")]
    incorrect = [r for r in records if not _get(r, "correct")]
    total_tokens = sum(int(_get(r, "n_tokens")) for r in records)
    return {
        "n": len(records),
        "accuracy": len(correct) / len(records) if records else None,
        "n_correct": len(correct),
        "n_no_answer": sum(_get(r, "predicted") is None for r in records),
        "grading": dict(gradings.pop()) if len(gradings) == 1 else [dict(g) for g in gradings],
        "accuracy_finished": (sum(bool(_get(r, "correct")) for r in finished) / len(finished)
                              if finished else None),
        "n_unfinished": n_unfinished,
        "unfinished_share": n_unfinished / len(records) if records else None,
        "mean_tokens": stats["mean_tokens"],
        "median_tokens": stats["median_tokens"],
        "total_tokens": total_tokens,
        "thoughts_per_trace": stats["thoughts_per_trace"],
        "reflection_transition_per_trace": stats["reflection_transition_per_trace"],
        "by_correctness": {"correct": _group_stats(correct),
                           "incorrect": _group_stats(incorrect)},
        "wall_time_s": wall_time_s,
        "tokens_per_s": (total_tokens / wall_time_s) if wall_time_s else None,
    }


def write_records(path: str | os.PathLike, records: Sequence[Record | dict[str, Any]]) -> Path:
    """Per-problem records as JSONL, written atomically."""
    from lens_steer.io import write_jsonl  # noqa: PLC0415 - keeps torch out of eval imports

    return write_jsonl(path, (r if isinstance(r, dict) else r.to_dict() for r in records))


def read_records(path: str | os.PathLike) -> list[Record]:
    """Records written by :func:`write_records`."""
    import json

    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(Record.from_dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise DataError(f"{path}:{lineno}: not a record ({e}); expected one JSON object "
                                "per line as written by write_records") from e
    return out
