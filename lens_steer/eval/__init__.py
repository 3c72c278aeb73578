"""Evaluation harness: answer extraction/checking, datasets and prompts, run metrics."""

from lens_steer.eval import code as _code  # noqa: E402,F401 - registers livecodebench
from lens_steer.eval.answers import (
    extract_answer,
    extract_boxed,
    is_equiv,
    latex_to_sympy,
    normalize_answer,
    numeric_match,
)
from lens_steer.eval.datasets import (
    TEMPLATES,
    DatasetUnavailableError,
    Problem,
    answer_checker,
    format_prompt,
    load_dataset,
    load_gsm8k,
    load_math500,
    load_toy,
    read_problems_jsonl,
)
from lens_steer.eval.metrics import (
    THOUGHT_TYPES,
    Record,
    extract_prediction,
    label_trace,
    read_records,
    score_generations,
    summarize,
    write_records,
)
from lens_steer.eval.runner import run_eval

__all__ = [
    "extract_answer", "extract_boxed", "is_equiv", "latex_to_sympy", "normalize_answer",
    "numeric_match", "TEMPLATES", "DatasetUnavailableError", "Problem", "answer_checker",
    "format_prompt", "load_dataset", "load_gsm8k", "load_math500", "load_toy",
    "read_problems_jsonl", "THOUGHT_TYPES", "Record", "extract_prediction", "label_trace",
    "read_records", "score_generations", "summarize", "write_records", "run_eval",
]
