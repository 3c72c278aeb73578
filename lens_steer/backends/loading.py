"""`load_model(source, backend=...)`: local HF directory, the shipped toy model, or a hub id."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lens_steer.backends.base import ModelBackend
from lens_steer.registry import BACKENDS


@BACKENDS.register("transformer_lens", overwrite=True)
def _transformer_lens(path: str, device: torch.device, dtype: torch.dtype,
                      **options) -> ModelBackend:
    from lens_steer.backends.transformer_lens import TransformerLensBackend

    return TransformerLensBackend(path, device=device, dtype=dtype, **options)


@BACKENDS.register("nnsight", overwrite=True)
def _nnsight(path: str, device: torch.device, dtype: torch.dtype, **options) -> ModelBackend:
    from lens_steer.backends.nnsight import NNsightBackend

    return NNsightBackend(path, device=device, dtype=dtype, **options)


def load_model(source: str | os.PathLike, backend: str = "transformer_lens",
               device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
               **backend_options) -> ModelBackend:
    """Load `source` behind the common interface.

    `source`: "toy" (the shipped toy reasoner), a local Hugging Face model directory (works
    offline), or a hub id such as "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" (needs network).
    `backend`: "transformer_lens" (TransformerBridge), "nnsight" (TransformersModel), or any
    name registered in `lens_steer.registry.BACKENDS` (a factory `(path, device, dtype,
    **options) -> ModelBackend`).
    nnsight options for large models: `device_map="auto"` (accelerate dispatch over the visible
    GPUs), `remote=True` (NDIF; needs a hub id and `NDIF_API_KEY`) or `remote="local"`,
    `remote_decode`, `prefill_chunk`; see `lens_steer.backends.nnsight`.
    With `device_map`, `device` is ignored: inputs go where the embedding lives.
    """
    factory = BACKENDS.get(backend)  # unknown names: ConfigError listing the registered ones
    remote = backend_options.get("remote", False)
    if remote:
        if backend != "nnsight":
            raise ValueError("remote execution (NDIF) needs backend='nnsight'")
        from lens_steer.backends.nnsight import check_remote

        check_remote(source, remote)  # before any network access: key and hub id
    path = resolve_source(source)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _resolve_dtype(dtype)
    return factory(path, device=device, dtype=dtype, **backend_options)


def resolve_source(source: str | os.PathLike) -> str:
    """Map "toy" to the shipped weights, keep existing directories, and check hub ids."""
    if str(source) == "toy":
        from lens_steer.toy import TOY_MODEL_DIR

        if not (Path(TOY_MODEL_DIR) / "config.json").exists():
            raise FileNotFoundError(
                f"the shipped toy model is missing at {TOY_MODEL_DIR}: reinstall the package or "
                "train it with `lens-steer toy train`")
        return str(TOY_MODEL_DIR)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{path} has no config.json: pass a Hugging Face model directory "
                "(saved with save_pretrained)")
        return str(path)
    if str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise FileNotFoundError(
            f"no model directory at {source!r}; pass a local Hugging Face model directory, "
            "'toy', or a hub id like 'org/name'")
    _check_hub_reachable(str(source))
    return str(source)


def _check_hub_reachable(repo_id: str, timeout_s: float = 3.0) -> None:
    """Fail fast (no retries, no hang) when a hub id cannot be fetched offline."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return
    hint = (f"cannot load {repo_id!r} from the Hugging Face hub: {{why}}. Offline, download it "
            "on a machine with network (`huggingface-cli download {repo}`), copy the folder here "
            "and pass its local path to load_model")
    if constants.HF_HUB_OFFLINE:
        raise ConnectionError(hint.format(why="HF_HUB_OFFLINE is set", repo=repo_id))
    import socket
    from urllib.parse import urlparse

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError as err:
        raise ConnectionError(
            hint.format(why=f"{host} is unreachable ({err})", repo=repo_id)) from None


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]
