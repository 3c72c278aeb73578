"""Held-out toy problems: a fixed evaluation seed, with every training question filtered out.

    problems = heldout_problems(500, exclude=training_questions(TOY_MODEL_DIR))
"""

from __future__ import annotations

from pathlib import Path

from lens_steer.io import read_json
from lens_steer.toy.problems import ToyProblem, generate_problems

EVAL_SEED = 1_000_003
"""Seed of the held-out problems (training uses small seeds; overlaps are filtered anyway)."""


def heldout_problems(n: int, seed: int = EVAL_SEED, exclude: set[str] | None = None
                     ) -> list[ToyProblem]:
    """`n` problems from `seed` whose question is not in `exclude` (the training questions)."""
    exclude = exclude or set()
    out: list[ToyProblem] = []
    batch = 0
    while len(out) < n:
        # later batches get seeds far from `seed + 1`, so neighbouring seeds' splits stay apart
        batch_seed = seed if batch == 0 else seed * 100_003 + batch
        out += [p for p in generate_problems(2 * n, batch_seed) if p.question not in exclude]
        batch += 1
    return out[:n]


def training_questions(model_dir: str | Path) -> set[str]:
    """Questions of every training stage of a toy model directory (`training_recipe.json`,
    else `training_config.json`); empty for a directory without either."""
    model_dir = Path(model_dir)
    recipe, single = model_dir / "training_recipe.json", model_dir / "training_config.json"
    configs = ([st["config"] for st in read_json(recipe)["stages"]] if recipe.exists()
               else [read_json(single)] if single.exists() else [])
    return {p.question for c in configs if "n_problems" in c and "seed" in c
            for p in generate_problems(c["n_problems"], c["seed"])}
