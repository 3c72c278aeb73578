"""Model loading: one entry point, two backends (TransformerLens bridge, nnsight)."""

from __future__ import annotations

from lens_steer.backends.base import (
    DecodeState,
    GenerationConfig,
    GenerationResult,
    ModelBackend,
)
from lens_steer.backends.hf_common import load_tokenizer
from lens_steer.backends.loading import BACKENDS, load_model, resolve_source

__all__ = ["load_model", "resolve_source", "BACKENDS", "ModelBackend", "GenerationConfig",
           "GenerationResult", "DecodeState", "load_tokenizer"]
