"""The toy reasoner: synthetic arithmetic reasoning traces and a tiny Qwen2 model trained on them.

`TOY_MODEL_DIR` is the shipped default (`lens_steer.load_model("toy")` resolves to it).
"""

from __future__ import annotations

from pathlib import Path

from lens_steer.toy.problems import ToyProblem, TraceRates, generate_problems
from lens_steer.toy.splits import EVAL_SEED, heldout_problems, training_questions

TOY_MODEL_DIR = Path(__file__).resolve().parent / "weights"
"""HF model directory of the shipped toy reasoner (config, fp16 safetensors, tokenizer)."""

__all__ = ["TOY_MODEL_DIR", "ToyProblem", "TraceRates", "generate_problems", "EVAL_SEED",
           "heldout_problems", "training_questions"]
