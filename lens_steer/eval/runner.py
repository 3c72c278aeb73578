"""One evaluation run: format prompts, generate with a backend, score, summarise, save."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lens_steer.eval.datasets import Problem, format_prompt
from lens_steer.eval.metrics import Record, score_generations, summarize, write_records

__all__ = ["run_eval"]


def run_eval(backend: Any, problems: Sequence[Problem], dataset: str, *, template: str = "raw",
             config: Any = None, interventions: Sequence[Any] = (), style: str = "auto",
             out_dir: str | os.PathLike | None = None, progress: bool = False
             ) -> tuple[list[Record], dict[str, Any]]:
    """Generate for `problems` with `backend` (a ``ModelBackend``) and score the outputs.

    Returns (records, summary); with `out_dir`, also writes ``records.jsonl`` and
    ``summary.json`` there. Wall time is measured around ``backend.generate``.
    """
    prompts = [format_prompt(p, template) for p in problems]
    t0 = time.perf_counter()
    result = backend.generate(prompts, config, interventions, progress=progress)
    wall = time.perf_counter() - t0
    records = score_generations(problems, result.texts, result.n_generated, dataset,
                                style=style, finish_reasons=getattr(result, "finish_reasons",
                                                                    None))
    summary = summarize(records, wall_time_s=wall)
    summary.update(dataset=dataset, template=template)
    if out_dir is not None:
        from lens_steer.io import write_json  # noqa: PLC0415

        out = Path(out_dir)
        write_records(out / "records.jsonl", records)
        write_json(out / "summary.json", summary)
    return records, summary
