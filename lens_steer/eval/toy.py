"""The toy reasoner on held-out toy problems, through the one evaluation path (`run_eval`).

Greedy decoding through `ModelBackend.generate` (interventions allowed), graded and summarised
by `lens_steer.eval.metrics`; on top, the toy's own shares (concise traces, thought types).

    metrics = evaluate("toy", n=500, out_dir="runs/toy_eval")   # metrics.json + records.jsonl
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lens_steer.backends import GenerationConfig, ModelBackend, load_model
from lens_steer.eval.datasets import Problem
from lens_steer.eval.metrics import Record, write_records
from lens_steer.eval.runner import run_eval
from lens_steer.interventions import Intervention
from lens_steer.io import write_json
from lens_steer.thoughts import DELIMITER, LABELS, THINK_CLOSE
from lens_steer.toy.problems import ToyProblem
from lens_steer.toy.splits import EVAL_SEED, heldout_problems, training_questions

__all__ = ["evaluate", "as_problems", "trace_style"]


def as_problems(toy: Sequence[ToyProblem], tag: str = "eval") -> list[Problem]:
    """Toy problems as evaluation `Problem`s with ids `{tag}-{i}` (the toy prompt kept for the
    "toy" template)."""
    return [Problem(id=f"{tag}-{i}", question=p.question, answer=str(p.answer),
                    source="toy", meta={"prompt": p.prompt, "n_steps": len(p.steps)})
            for i, p in enumerate(toy)]


def trace_style(text: str) -> str:
    """"verbose" when the think part of a completion has thoughts (a blank line), else
    "concise" (the toy model writes one of the two styles)."""
    return "verbose" if DELIMITER in text.split(THINK_CLOSE)[0] else "concise"


def _toy_extras(group: dict[str, Any], records: Sequence[Record]) -> dict[str, Any]:
    """Shares of each thought type among all thoughts, and of concise traces."""
    per_trace = group["thoughts_per_trace"]
    total = per_trace.get("total") or 0.0
    return {"thought_share": {k: (per_trace[k] / total if total else 0.0) for k in LABELS},
            "concise_share": (sum(r.meta["style"] == "concise" for r in records)
                              / max(1, len(records)))}


def evaluate(model: ModelBackend | str | Path = "toy", n: int = 500, seed: int = EVAL_SEED,
             out_dir: str | Path | None = None, max_new_tokens: int = 256,
             batch_size: int = 64, progress: bool = True, threads: int | None = 1,
             backend: str | None = None, interventions: Sequence[Intervention] = ()
             ) -> dict[str, Any]:
    """Greedy-decode `n` held-out problems; write `metrics.json` and `records.jsonl` to `out_dir`.

    `model`: a loaded `ModelBackend`, a model directory, or "toy" (loaded with `backend`,
    default `load_model`'s). Problems whose question occurs in any training stage of the
    model's directory (`training_questions`) are skipped. `threads`: torch intra-op threads
    (None leaves the setting alone).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    if not isinstance(model, ModelBackend):
        model = load_model(model, **({"backend": backend} if backend else {}))
    exclude = training_questions(model.source) if Path(model.source).is_dir() else set()
    problems = as_problems(heldout_problems(n, seed, exclude), f"heldout-{seed}")
    config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    records, summary = run_eval(model, problems, "toy", template="toy", config=config,
                                interventions=interventions, progress=progress)
    for r in records:
        r.meta["style"] = trace_style(r.generated_text)
    metrics = {**summary, **_toy_extras(summary, records)}
    for name, group in summary["by_correctness"].items():
        rows = [r for r in records if r.correct == (name == "correct")]
        group.update(_toy_extras(group, rows))
    metrics.update(n_problems=len(records), seed=seed, max_new_tokens=max_new_tokens,
                   decoding="greedy", model=model.source,
                   generation_wall_time_s=round(summary["wall_time_s"], 1))
    if out_dir is not None:
        write_records(Path(out_dir) / "records.jsonl", records)
        write_json(Path(out_dir) / "metrics.json", metrics)
    return metrics
