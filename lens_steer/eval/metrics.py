"""Per-problem records and run-level metrics: accuracy, token counts, thoughts per trace by type,
wall time and tokens/s, overall and split by correctness."""

from __future__ import annotations

import os
import statistics
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lens_steer.eval.answers import extract_answer
from lens_steer.eval.datasets import Problem, answer_checker

__all__ = ["Record", "THOUGHT_TYPES", "score_generations", "summarize", "extract_prediction",
           "label_trace", "write_records", "read_records"]

THOUGHT_TYPES: tuple[str, ...] = ("execution", "reflection", "transition")
THINK_CLOSE = "</think>"


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
    """SEAL label per thought of the trace; None when `lens_steer.thoughts` is unavailable."""
    thought_counts: dict[str, int] = field(default_factory=dict)
    dataset: str = ""
    finish_reason: str | None = None
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


def extract_prediction(text: str, style: str = "auto") -> str | None:
    """The predicted answer of a generation: looked for after the last ``</think>`` first (the
    answer section), then anywhere in the text."""
    if THINK_CLOSE in text:
        tail = text.rsplit(THINK_CLOSE, 1)[1]
        ans = extract_answer(tail, style)
        if ans is not None:
            return ans
    return extract_answer(text, style)


_warned_no_thoughts = False


def label_trace(text: str, think_only: bool = True) -> list[str] | None:
    """SEAL labels of the thoughts in `text` via ``lens_steer.thoughts``; None if unavailable."""
    global _warned_no_thoughts
    try:
        from lens_steer.thoughts import label_thought, split_thoughts  # noqa: PLC0415
    except ImportError:
        if not _warned_no_thoughts:
            warnings.warn("lens_steer.thoughts is unavailable; thought counts are left empty",
                          stacklevel=2)
            _warned_no_thoughts = True
        return None
    return [label_thought(t) for t in split_thoughts(text, think_only=think_only)]


def _counts(labels: Sequence[str] | None) -> dict[str, int]:
    if labels is None:
        return {}
    c = Counter(labels)
    return {**{k: c.get(k, 0) for k in THOUGHT_TYPES},
            **{k: v for k, v in c.items() if k not in THOUGHT_TYPES}}


def score_generations(problems: Sequence[Problem], texts: Sequence[str],
                      n_tokens: Sequence[int], dataset: str, *, style: str = "auto",
                      think_only: bool = True,
                      finish_reasons: Sequence[str] | None = None) -> list[Record]:
    """Extract, check and thought-label each generation, one Record per problem.

    `texts` are the generated continuations (prompt excluded), `n_tokens` their generated-token
    counts; `dataset` picks the checker (:func:`answer_checker`).
    """
    if not (len(problems) == len(texts) == len(n_tokens)):
        raise ValueError(f"lengths differ: {len(problems)} problems, {len(texts)} texts, "
                         f"{len(n_tokens)} token counts; pass one of each per problem")
    if finish_reasons is not None and len(finish_reasons) != len(problems):
        raise ValueError("finish_reasons needs one entry per problem")
    check = answer_checker(dataset)
    out = []
    for i, (p, text, nt) in enumerate(zip(problems, texts, n_tokens, strict=True)):
        pred = extract_prediction(text, style)
        labels = label_trace(text, think_only=think_only)
        out.append(Record(
            id=p.id, question=p.question, gold=p.answer, generated_text=text, predicted=pred,
            correct=bool(check(pred, p.answer)), n_tokens=int(nt), thought_labels=labels,
            thought_counts=_counts(labels), dataset=p.source or dataset,
            finish_reason=None if finish_reasons is None else finish_reasons[i]))
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
            "thoughts_per_trace": per_trace}


def summarize(records: Sequence[Record | dict[str, Any]],
              wall_time_s: float | None = None) -> dict[str, Any]:
    """Run metrics from records (Record objects or their dicts, e.g. read back from JSONL).

    Keys: n, accuracy, n_correct, n_no_answer, mean_tokens, median_tokens, total_tokens,
    thoughts_per_trace ({execution, reflection, transition, total} means per trace),
    by_correctness ({"correct"|"incorrect": {n, mean_tokens, median_tokens,
    thoughts_per_trace}}), wall_time_s, tokens_per_s. Undefined values (empty sets, no wall
    time) are None, never NaN, so the dict stays valid JSON.
    """
    stats = _group_stats(records)
    correct = [r for r in records if _get(r, "correct")]
    incorrect = [r for r in records if not _get(r, "correct")]
    total_tokens = sum(int(_get(r, "n_tokens")) for r in records)
    return {
        "n": len(records),
        "accuracy": len(correct) / len(records) if records else None,
        "n_correct": len(correct),
        "n_no_answer": sum(_get(r, "predicted") is None for r in records),
        "mean_tokens": stats["mean_tokens"],
        "median_tokens": stats["median_tokens"],
        "total_tokens": total_tokens,
        "thoughts_per_trace": stats["thoughts_per_trace"],
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

    with open(path, encoding="utf-8") as f:
        return [Record.from_dict(json.loads(line)) for line in f if line.strip()]
