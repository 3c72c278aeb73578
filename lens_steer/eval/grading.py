"""Grading protocols: which answer of a generation is read, how it is compared, and what an
unfinished trace counts as. The protocol is recorded with every record and in metrics.json.

- ``official``: the papers' parser. SEAL (eval_MATH_steering.py) and ASC read the last
  ``\\boxed{}`` of the whole output and compare it with the gold answer by math equality; no box
  means wrong. Equality is the dataset's checker (`answer_checker`: bounded `is_equiv`, GSM8K
  exact number), the same for both protocols.
- ``lenient``: the last box of the answer section (after ``</think>``), else ``#### N``, "The
  answer is N", an ``**Answer:**`` line; several boxes in the answer section read as one set
  when the gold answer is a list ("-2, 1" from ``\\boxed{1}`` and ``\\boxed{-2}``).

Unfinished traces (stopped at the token limit without closing ``</think>``; for a model without
a think token, any trace stopped at the limit) are wrong by default (``unfinished="wrong"``), as in
the papers, where they hold no final box. ``unfinished="graded"`` grades them like the others (a
"the answer is X" said mid-reasoning then counts). `summarize` reports the accuracy over finished
traces and the unfinished share beside the headline accuracy either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from lens_steer.errors import ConfigError
from lens_steer.eval.answers import (
    _as_sequence,
    extract_answer,
    extract_boxed,
    extract_boxed_all,
    normalize_answer,
)
from lens_steer.thoughts import THINK_CLOSE

__all__ = ["PROTOCOLS", "UNFINISHED", "Grading", "DATASET_PROTOCOL", "default_grading",
           "is_unfinished", "grade", "extract_prediction"]

PROTOCOLS: tuple[str, ...] = ("official", "lenient")
UNFINISHED: tuple[str, ...] = ("wrong", "graded")

DATASET_PROTOCOL: dict[str, str] = {"math500": "lenient", "gsm8k": "lenient", "toy": "lenient"}
"""Protocol per dataset when none is given (presets choose "official"). Lenient is the default:
on MATH-500's own solutions and the misses of issue 18 it finds every match the official parser
finds, and no false positive (docs/steering.md, "Grading")."""


@dataclass(frozen=True)
class Grading:
    """How generations are graded: the protocol and what unfinished traces count as."""

    protocol: str = "lenient"
    """"official" (last box of the output) or "lenient" (answer section, fallbacks)."""
    unfinished: str = "wrong"
    """"wrong" (default, as the papers) or "graded" (graded like finished traces)."""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown grading protocol {self.protocol!r}; choose one of "
                              f"{list(PROTOCOLS)}")
        if self.unfinished not in UNFINISHED:
            raise ConfigError(f"unfinished must be one of {list(UNFINISHED)}, got "
                              f"{self.unfinished!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_grading(dataset: str, protocol: str | None = None, unfinished: str = "wrong"
                    ) -> Grading:
    """The grading for `dataset` (its default protocol unless `protocol` is given)."""
    from lens_steer.eval.datasets import _canonical  # noqa: PLC0415

    key = _canonical(dataset) if dataset else ""
    return Grading(protocol or DATASET_PROTOCOL.get(key, "lenient"), unfinished)


def is_unfinished(text: str, finish_reason: str | None) -> bool | None:
    """True when the generation stopped at the token limit still thinking (no ``</think>``);
    None when the finish reason is unknown."""
    if finish_reason is None:
        return None
    return finish_reason in ("length", "position_limit") and THINK_CLOSE not in text


def extract_prediction(text: str, style: str = "auto") -> str | None:
    """The lenient prediction: looked for after the last ``</think>`` first (the answer section),
    then anywhere in the text."""
    if THINK_CLOSE in text:
        ans = extract_answer(text.rsplit(THINK_CLOSE, 1)[1], style)
        if ans is not None:
            return ans
    return extract_answer(text, style)


def _several_boxes(text: str, gold: str) -> str | None:
    """Boxes of the answer section joined as a list when the gold answer is a bare list."""
    gold_seq = _as_sequence(normalize_answer(gold))
    if gold_seq is None or gold_seq[0] != "":
        return None
    section = text.rsplit(THINK_CLOSE, 1)[1] if THINK_CLOSE in text else text
    boxes = list(dict.fromkeys(extract_boxed_all(section)))
    if len(boxes) < 2 or any(_as_sequence(normalize_answer(b)) for b in boxes):
        return None
    return ", ".join(boxes)


def grade(text: str, gold: str, checker: Callable[[str | None, str], bool],
          protocol: str = "lenient", style: str = "auto") -> tuple[str | None, bool]:
    """(prediction, correct) of one generation under `protocol`."""
    if protocol == "official":
        pred = extract_boxed(text)
        return pred, bool(pred is not None and checker(pred, gold))
    if protocol != "lenient":
        raise ConfigError(f"unknown grading protocol {protocol!r}; choose one of "
                          f"{list(PROTOCOLS)}")
    pred = extract_prediction(text, style)
    if pred is not None and checker(pred, gold):
        return pred, True
    several = _several_boxes(text, gold)
    if several is not None and checker(several, gold):
        return several, True
    return pred, False
