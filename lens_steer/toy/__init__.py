"""The toy reasoner: synthetic reasoning traces and the small model trained on them."""

from pathlib import Path

TOY_MODEL_DIR = Path(__file__).resolve().parent / "weights"
