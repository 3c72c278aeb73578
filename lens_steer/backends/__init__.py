"""Model loading: one entry point, two backends (TransformerLens bridge, nnsight)."""

from __future__ import annotations

from lens_steer.backends.base import GenerationConfig, GenerationResult, ModelBackend
from lens_steer.backends.loading import BACKENDS, load_model, resolve_source

__all__ = ["load_model", "resolve_source", "BACKENDS", "ModelBackend", "GenerationConfig",
           "GenerationResult"]
