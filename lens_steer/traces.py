"""Reasoning traces as JSONL: one object per line with ``prompt``, ``response``, ``correct`` and
an optional ``id``, the format every command reads and writes.

JSON keeps the blank lines that split a trace into thoughts; a plain-text file with one trace
per line cannot (it has no ``\\n\\n``, so extraction finds no thought). Selection helpers pick the
extraction set: the SEAL paper's first N correct + first N incorrect traces in file order
(``select_traces(..., "first", n)``), a seeded balanced random sample, or all.

    traces = read_traces("traces.jsonl")                   # errors name file:line
    chosen = select_traces(traces, "first", n=500)         # SEAL: 500 correct + 500 incorrect
    cache_thoughts(model, [t.to_cache() for t in chosen], "runs/cache")
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lens_steer.errors import ConfigError, DataError

__all__ = ["Trace", "read_traces", "write_traces", "select_traces", "SELECTIONS",
           "check_thoughts", "traces_from_records"]

SELECTIONS: tuple[str, ...] = ("first", "balanced", "all")
_FIELDS = ("prompt", "response", "correct", "id")


@dataclass(frozen=True)
class Trace:
    """One generation: the prompt it answered, the response, and whether it was correct."""

    prompt: str
    response: str
    correct: bool | None = None
    """None when ungraded (the selections that balance correctness refuse those)."""
    id: str | None = None
    where: str = ""
    """`file:line` it was read from (for error messages); not written."""

    @property
    def text(self) -> str:
        """Prompt and response as the model saw them (what thoughts are extracted from)."""
        return self.prompt + self.response

    def to_dict(self) -> dict[str, Any]:
        row = {k: v for k, v in asdict(self).items() if k != "where"}
        if row["id"] is None:
            del row["id"]
        return row

    def to_cache(self) -> dict[str, Any]:
        """The dict `lens_steer.cache.cache_thoughts` takes (text, id, correct)."""
        return {"text": self.text, "id": self.id if self.id is not None else self.where,
                "correct": self.correct}


def _parse(row: Any, where: str) -> Trace:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with 'prompt', 'response', 'correct', "
                        f"got {type(row).__name__}")
    missing = [k for k in ("prompt", "response") if k not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; each line needs 'prompt' and "
                        "'response' (strings), 'correct' (true/false/null) and optionally 'id'")
    unknown = sorted(set(row) - set(_FIELDS))
    if unknown:
        raise DataError(f"{where}: unknown field(s) {unknown}; allowed: {list(_FIELDS)}")
    if not isinstance(row["prompt"], str) or not isinstance(row["response"], str):
        raise DataError(f"{where}: 'prompt' and 'response' must be strings")
    correct = row.get("correct")
    if correct is not None and not isinstance(correct, bool):
        raise DataError(f"{where}: 'correct' must be true, false or null, got {correct!r}")
    tid = row.get("id")
    return Trace(row["prompt"], row["response"], correct, None if tid is None else str(tid),
                 where)


def read_traces(path: str | os.PathLike) -> list[Trace]:
    """Traces from a JSONL file; a malformed line raises `DataError` naming `file:line`."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"traces file not found: {p} (write one with lens_steer.traces."
                        "write_traces or `lens-steer traces`)")
    out = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                hint = (" (is this a plain-text file with one trace per line? traces are JSONL: "
                        '{"prompt": ..., "response": ..., "correct": ...})'
                        if lineno == 1 and not line.lstrip().startswith("{") else "")
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})"
                                f"{hint}") from e
            out.append(_parse(row, where))
    if not out:
        raise DataError(f"{p}: holds no trace")
    return out


def write_traces(path: str | os.PathLike, traces: Iterable[Trace | dict[str, Any]]) -> Path:
    """Write traces as JSONL, atomically; dict rows are validated like read ones."""
    from lens_steer.io import write_jsonl  # noqa: PLC0415 - keeps torch out of this import

    rows = [(t if isinstance(t, Trace) else _parse(t, f"trace {i}")).to_dict()
            for i, t in enumerate(traces)]
    return write_jsonl(path, rows)


def select_traces(traces: Sequence[Trace], how: str = "first", n: int | None = None,
                  seed: int = 0) -> list[Trace]:
    """The extraction set.

    - "first": the first `n` correct and the first `n` incorrect traces in file order (SEAL:
      n = 500 of the model's greedy MATH-train traces), kept in file order;
    - "balanced": `n` correct and `n` incorrect drawn at random (seeded), `n` defaulting to the
      size of the smaller group;
    - "all": every trace (`n` ignored).
    """
    if how not in SELECTIONS:
        raise ConfigError(f"unknown selection {how!r}; choose one of {list(SELECTIONS)}")
    if how == "all":
        return list(traces)
    ungraded = [t.where or str(i) for i, t in enumerate(traces) if t.correct is None]
    if ungraded:
        raise DataError(f"selection {how!r} balances correct and incorrect traces, but "
                        f"{len(ungraded)} trace(s) have correct=null (first: {ungraded[0]}); "
                        "grade them or use how='all'")
    right = [i for i, t in enumerate(traces) if t.correct]
    wrong = [i for i, t in enumerate(traces) if not t.correct]
    if n is not None and n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    if how == "first":
        k = len(traces) if n is None else n
        keep = set(right[:k]) | set(wrong[:k])
    else:
        k = min(len(right), len(wrong)) if n is None else n
        rng = random.Random(seed)
        keep = set(rng.sample(right, min(k, len(right)))) | set(
            rng.sample(wrong, min(k, len(wrong))))
    return [traces[i] for i in sorted(keep)]


def check_thoughts(traces: Sequence[Trace], tokenizer: Any, *, think_only: bool = True,
                   labeler: Any = None) -> list[int]:
    """Number of thoughts of each trace; `DataError` naming the first trace that has none."""
    from lens_steer.thoughts import require_thoughts, segment_thoughts  # noqa: PLC0415

    counts = []
    for i, t in enumerate(traces):
        ids = tokenizer(t.text, add_special_tokens=False)["input_ids"]
        thoughts = segment_thoughts(ids, tokenizer, think_only=think_only,
                                    **({} if labeler is None else {"labeler": labeler}))
        counts.append(len(require_thoughts(thoughts, t.where or f"trace {i}")))
    return counts


def traces_from_records(records: Iterable[Any], prompts: Sequence[str]) -> list[Trace]:
    """Traces from evaluation records (`lens_steer.eval.metrics.Record` or their dicts) and the
    prompts they were generated from (same order)."""
    out = []
    for rec, prompt in zip(records, prompts, strict=True):
        get = rec.get if isinstance(rec, dict) else lambda k, r=rec: getattr(r, k)
        out.append(Trace(prompt, get("generated_text"), bool(get("correct")), str(get("id"))))
    return out
