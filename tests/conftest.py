"""Shared fixtures: tiny random-weight models saved to a session temp dir (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lens_steer.testing import build_tiny_model, build_tokenizer

torch.set_num_threads(1)  # tiny models: thread start-up costs more than it saves
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session", params=["qwen2", "llama"])
def tiny_model_dir(request, tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A random-weight tiny model (Qwen2 or Llama, grouped-query attention) as a HF dir."""
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)
    return build_tiny_model(out, request.param, tokenizer=tok)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-qwen2")
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)
    return build_tiny_model(out, "qwen2", tokenizer=tok)


_LOADED: dict = {}


def loaded(path: Path, backend: str):
    """Load each (model, backend) once per session; tests must not mutate it."""
    from lens_steer import load_model

    key = (str(path), backend)
    if key not in _LOADED:
        _LOADED[key] = load_model(path, backend=backend)
    return _LOADED[key]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.skip(f"../shared is absent ({SHARED}); it holds the real-format data samples")
    return SHARED
