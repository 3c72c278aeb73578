"""The one evaluation path: format prompts, generate through `ModelBackend.generate` (with
interventions), grade, summarise, save. Toy evaluation, the studies, the demo and the benchmarks
all score generations here, so every number means the same thing."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens_steer.eval.datasets import Problem, format_prompt
from lens_steer.eval.metrics import Record, score_generations, summarize, write_records
from lens_steer.registry import GRADERS
from lens_steer.thoughts import label_thought

if TYPE_CHECKING:
    from lens_steer.backends.base import GenerationConfig, GenerationResult, ModelBackend
    from lens_steer.eval.grading import Grading
    from lens_steer.interventions import Intervention

__all__ = ["run_eval"]


def run_eval(backend: ModelBackend, problems: Sequence[Problem], dataset: str, *,
             template: str = "raw", config: GenerationConfig | None = None,
             interventions: Sequence[Intervention] = (), style: str = "auto",
             labeler: str | Callable[[str], str] | None = label_thought,
             grading: Grading | str | None = None,
             generate: Callable[..., GenerationResult] | None = None,
             out_dir: str | os.PathLike | None = None, progress: bool = False
             ) -> tuple[list[Record], dict[str, Any]]:
    """Generate for `problems` with `backend` and score the outputs.

    `labeler`: how thoughts are labelled for the thought metrics (a name registered in
    `lens_steer.registry.LABELLERS`, a `LabelRules` or a callable; SEAL's rules by default).
    `grading`: a `lens_steer.eval.grading.Grading`, "official"/"lenient", or None (dataset
    default); recorded in the summary. `generate`: called instead of `backend.generate` with the
    same arguments (a `lens_steer.methods` method's decoding: DEER, budget forcing, ...).
    Datasets registered in `lens_steer.registry.GRADERS` (code) are graded by their grader.
    Returns (records, summary); with `out_dir`, also writes ``records.jsonl`` and
    ``summary.json`` there. Wall time is measured around the generation.
    """
    from lens_steer.io import write_json  # noqa: PLC0415 - keeps torch out of eval imports

    prompts = [format_prompt(p, template) for p in problems]
    t0 = time.perf_counter()
    result = (generate or backend.generate)(prompts, config, interventions, progress=progress)
    wall = time.perf_counter() - t0
    score = GRADERS.get(dataset) if dataset in GRADERS else score_generations
    records = score(problems, result.texts, result.n_generated, dataset,
                    style=style, finish_reasons=result.finish_reasons,
                    labeler=labeler, grading=grading)
    summary = summarize(records, wall_time_s=wall)
    summary.update(dataset=dataset, template=template)
    if out_dir is not None:
        out = Path(out_dir)
        write_records(out / "records.jsonl", records)
        write_json(out / "summary.json", summary)
    return records, summary
