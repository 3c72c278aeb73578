"""Plan memory before a run: weights + KV cache + captured activations + forward working set.

Works from a config alone (a model directory's `config.json`, a known hub id, or a dict), so
QwQ-32B can be planned on a laptop:

    plan = plan_memory("Qwen/QwQ-32B", dtype="bf16", batch_size=8, max_tokens=10_000,
                       device_memory_bytes=80 * GiB, n_devices=4)
    print(plan)                     # a table; plan.fits, plan.largest_safe_batch
    plan.require_fit()              # raises MemoryError with the numbers instead of an OOM later

What the terms count (bytes, for a decoder of L layers, width d, H query / K key-value heads of
size h, MLP width I, vocabulary V, batch B, T = max_tokens, C = prefill chunk or T):

- weights: every parameter (embeddings, attention with Qwen2's q/k/v biases, gated MLP, norms,
  an untied `lm_head`) x bytes per element.
- kv_cache: 2 x L x K x h x T x B x bytes (the cache at its longest).
- captured: the gathered rows `capture_resid` keeps, float32: layers x positions x d x 4.
- working: the largest transient of one forward over C new positions, in its biggest phase:
  the gated MLP (residual + normed input + gate/up/product: B C (2d + 3I)) or attention
  (residual + normed input, q/k/v, k/v expanded to H heads, attention output:
  B C (2d + (3H + 4K) h)), plus the attention scores when they are materialised
  (`attention="eager"`: 2 B H C T; fused kernels (sdpa/flash) keep none), plus the logits kept
  (B x logits_positions x V, and a float32 copy of the last position for sampling).

The estimate covers what PyTorch allocates for tensors; the CUDA context, allocator
fragmentation and NCCL buffers are not in it, which is why `largest_safe_batch` keeps a
`headroom` fraction (default 10%) of the device memory free.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend

GiB = 1024 ** 3
MiB = 1024 ** 2

_ARCH_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "intermediate_size")

# From the published config.json files (checked against mirrors of each file).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/QwQ-32B": dict(
        model_type="qwen2", num_hidden_layers=64, hidden_size=5120, num_attention_heads=40,
        num_key_value_heads=8, vocab_size=152064, intermediate_size=27648,
        tie_word_embeddings=False),
    "Qwen/QwQ-32B-Preview": dict(
        model_type="qwen2", num_hidden_layers=64, hidden_size=5120, num_attention_heads=40,
        num_key_value_heads=8, vocab_size=152064, intermediate_size=27648,
        tie_word_embeddings=False),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": dict(
        model_type="qwen2", num_hidden_layers=28, hidden_size=1536, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, intermediate_size=8960,
        tie_word_embeddings=False),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": dict(
        model_type="qwen2", num_hidden_layers=28, hidden_size=3584, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, intermediate_size=18944,
        tie_word_embeddings=False),
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": dict(  # Llama-3.1-8B shape
        model_type="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, intermediate_size=14336,
        tie_word_embeddings=False),
}

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}
ATTENTION = ("sdpa", "flash", "eager")


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a torch dtype or its name ('bf16', 'float32', ...)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


def parse_bytes(text: str | int | float) -> int:
    """'80GiB', '80GB', '512MiB', '1.5e9' -> bytes."""
    if isinstance(text, int | float):
        return int(text)
    s = text.strip().replace(" ", "")
    units = {"tib": 1024 ** 4, "gib": GiB, "mib": MiB, "kib": 1024, "tb": 10 ** 12,
             "gb": 10 ** 9, "mb": 10 ** 6, "kb": 10 ** 3, "b": 1}
    for unit, mult in units.items():
        if s.lower().endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(float(s))


def load_config(model: str | os.PathLike | dict | Any) -> dict[str, Any]:
    """Architecture numbers from a dict / HF config, a model dir, a known hub id, or a cached
    hub `config.json`; no weights are read."""
    if isinstance(model, dict):
        cfg = dict(model)
    elif hasattr(model, "to_dict"):
        cfg = model.to_dict()
    elif str(model) in KNOWN_CONFIGS:
        cfg = dict(KNOWN_CONFIGS[str(model)])
    elif (Path(model).expanduser() / "config.json").exists():
        cfg = json.loads((Path(model).expanduser() / "config.json").read_text())
    else:
        cfg = None
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(model), "config.json")
            if isinstance(cached, str):
                cfg = json.loads(Path(cached).read_text())
        except Exception:  # noqa: BLE001 - not a hub id: fall through to the error below
            cfg = None
        if cfg is None:
            raise FileNotFoundError(
                f"no config for {model!r}: pass a model directory with config.json, one of "
                f"{sorted(KNOWN_CONFIGS)}, or a hub id already in the local HF cache")
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg, **cfg["text_config"]}
    cfg.setdefault("num_key_value_heads", cfg.get("num_attention_heads"))
    missing = [k for k in _ARCH_KEYS if cfg.get(k) is None]
    if missing:
        raise ValueError(f"config lacks {missing}: the planner needs a decoder-only LM config")
    return cfg


def count_parameters(cfg: dict[str, Any]) -> int:
    """Parameters of a Llama/Qwen2-style decoder from its config (matches `numel()` sums)."""
    d, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // heads
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    qkv_bias = cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias"))
    attn = d * heads * hd + 2 * d * kv * hd + heads * hd * d
    if qkv_bias:
        attn += heads * hd + 2 * kv * hd
    if cfg.get("attention_bias") and cfg.get("model_type") != "qwen2":
        attn += d  # o_proj bias (Llama's attention_bias covers it too)
    mlp = 3 * d * inter + (3 * inter if cfg.get("mlp_bias") else 0)
    per_layer = attn + mlp + 2 * d
    embed = vocab * d
    head = 0 if cfg.get("tie_word_embeddings") else vocab * d
    return embed + n_layers * per_layer + d + head


@dataclass
class MemoryPlan:
    """Estimated bytes of one run; see the module docstring for what each term counts."""

    model: str
    dtype: str
    batch_size: int
    max_tokens: int
    prefill_chunk: int | None
    n_params: int
    weights: int
    kv_cache: int
    captured: int
    working: int
    device_memory: int | None = None
    """Memory of one device."""
    n_devices: int = 1
    headroom: float = 0.1
    largest_safe_batch: int | None = None
    details: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.captured + self.working

    @property
    def per_device(self) -> int:
        """The busiest device under a layer-wise device map: its share of weights and cache
        plus the whole working set (one layer runs at a time) and the captured rows."""
        return -(-(self.weights + self.kv_cache) // self.n_devices) + self.working + self.captured

    @property
    def usable(self) -> int | None:
        return None if self.device_memory is None else int(self.device_memory * (1 - self.headroom))

    @property
    def fits(self) -> bool | None:
        return None if self.usable is None else self.per_device <= self.usable

    def require_fit(self) -> MemoryPlan:
        """Raise `MemoryError` with the numbers now, rather than run out of memory midway."""
        if self.fits is False:
            hint = (f"the largest batch that fits is {self.largest_safe_batch}"
                    if self.largest_safe_batch else
                    "even batch 1 does not fit: use more GPUs (device_map='auto'), bf16, a "
                    "shorter max_tokens, prefill_chunk, or remote=True (NDIF)")
            raise MemoryError(f"{hint}.\n{self}")
        return self

    def roofline_seconds(self, prompt_tokens: int, new_tokens: int,
                         hbm_bytes_per_s: float = 3.35e12, flops_per_s: float = 4.0e14
                         ) -> dict[str, float]:
        """Lower-bound time of one batch: prefill compute-bound (2 x params x tokens FLOPs),
        decode bandwidth-bound (weights + the KV cache read once per step). A layer-wise
        device map runs its GPUs one after another, so they do not add bandwidth. Defaults:
        H100 SXM HBM3 bandwidth and ~40% of its dense bf16 peak."""
        b = self.batch_size
        prefill = 2 * self.n_params * b * prompt_tokens / flops_per_s
        kv_per_token = self.kv_cache / max(self.max_tokens, 1)
        mean_kv = kv_per_token * (prompt_tokens + new_tokens / 2)
        step = (self.weights + mean_kv) / hbm_bytes_per_s
        step = max(step, 2 * self.n_params * b / flops_per_s)
        return {"prefill_s": prefill, "decode_step_s": step, "decode_s": step * new_tokens,
                "total_s": prefill + step * new_tokens}

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "dtype": self.dtype, "batch_size": self.batch_size,
                "max_tokens": self.max_tokens, "prefill_chunk": self.prefill_chunk,
                "n_params": self.n_params, "weights": self.weights, "kv_cache": self.kv_cache,
                "captured": self.captured, "working": self.working, "total": self.total,
                "device_memory": self.device_memory, "n_devices": self.n_devices,
                "per_device": self.per_device, "fits": self.fits,
                "largest_safe_batch": self.largest_safe_batch}

    def __str__(self) -> str:
        chunk = f", prefill chunk {self.prefill_chunk}" if self.prefill_chunk else ""
        rows = [("weights", self.weights, f"{self.n_params / 1e9:.2f}B params x {self.dtype}"),
                ("KV cache", self.kv_cache, f"batch {self.batch_size} x {self.max_tokens} tokens"),
                ("captured activations", self.captured, "float32 rows kept"),
                ("forward working set", self.working, "largest transient of one forward"),
                ("total", self.total, "")]
        lines = [f"memory plan: {self.model} ({self.dtype}), batch {self.batch_size}, "
                 f"max {self.max_tokens} tokens{chunk}",
                 f"  {'term':<22}{'GiB':>10}  note"]
        lines += [f"  {name:<22}{value / GiB:>10.3f}  {note}" for name, value, note in rows]
        if self.n_devices > 1:
            lines.append(f"  {'per device':<22}{self.per_device / GiB:>10.3f}  "
                         f"weights + cache split over {self.n_devices} devices")
        if self.device_memory is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            each = " each" if self.n_devices > 1 else ""
            lines.append(f"  {'device memory':<22}{self.device_memory / GiB:>10.3f}  "
                         f"{verdict}{each} (keeping {self.headroom:.0%} free)")
            lines.append(f"  largest safe batch: {self.largest_safe_batch}")
        return "\n".join(lines)


def plan_memory(config_or_model_dir: str | os.PathLike | dict | Any, *, dtype: Any = "bf16",
                batch_size: int = 1, max_tokens: int = 4096, n_capture_layers: int = 0,
                n_capture_positions: int = 0, device_memory_bytes: int | str | None = None,
                n_devices: int = 1, prefill_chunk: int | None = None,
                attention: str = "sdpa", logits_positions: int = 1,
                headroom: float = 0.1) -> MemoryPlan:
    """Estimate the memory of a run (weights, KV cache, captured rows, working set).

    `max_tokens`: prompt + generated tokens per sequence. `n_capture_positions`: rows kept per
    captured layer over the whole run. `logits_positions`: positions whose logits one forward
    keeps (1 for generation with `logits_to_keep=1`; the sequence length for `logits()`).
    `prefill_chunk`: tokens per forward (default: all `max_tokens` at once, the worst case).
    With `device_memory_bytes` (memory of one device; `n_devices` of them under a layer-wise
    device map), also finds the largest batch that fits with `headroom` kept free.
    """
    if batch_size < 1 or max_tokens < 1:
        raise ValueError("batch_size and max_tokens must be >= 1")
    if n_devices < 1:
        raise ValueError("n_devices must be >= 1")
    if attention not in ATTENTION:
        raise ValueError(f"attention={attention!r}; use one of {ATTENTION}")
    cfg = load_config(config_or_model_dir)
    nbytes = dtype_bytes(dtype)
    d, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // heads
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    n_params = count_parameters(cfg)
    chunk = min(prefill_chunk or max_tokens, max_tokens)

    def terms(b: int) -> dict[str, int]:
        mlp = b * chunk * (2 * d + 3 * inter)
        attn = b * chunk * (2 * d + (3 * heads + 4 * kv) * hd)
        if attention == "eager":
            attn += 2 * b * heads * chunk * max_tokens
        layer = max(mlp, attn) * nbytes
        logits = b * min(logits_positions, max_tokens) * vocab * nbytes + b * vocab * 4
        return {"kv_cache": 2 * n_layers * kv * hd * max_tokens * b * nbytes,
                "working": layer + logits,
                "layer_transient": layer, "logits": logits}

    weights = n_params * nbytes
    captured = n_capture_layers * n_capture_positions * d * 4
    t = terms(batch_size)
    name = str(config_or_model_dir) if not isinstance(config_or_model_dir, dict) else \
        cfg.get("_name_or_path", "config")
    plan = MemoryPlan(model=name, dtype=str(dtype).removeprefix("torch."),
                      batch_size=batch_size, max_tokens=max_tokens, prefill_chunk=prefill_chunk,
                      n_params=n_params, weights=weights, kv_cache=t["kv_cache"],
                      captured=captured, working=t["working"],
                      details={k: v for k, v in t.items() if k not in ("kv_cache", "working")},
                      headroom=headroom, n_devices=n_devices)
    if device_memory_bytes is not None:
        plan.device_memory = parse_bytes(device_memory_bytes)
        usable = plan.usable

        def total(b: int) -> int:
            tb = terms(b)
            return -(-(weights + tb["kv_cache"]) // n_devices) + captured + tb["working"]

        plan.largest_safe_batch = _largest(total, usable)
    return plan


def _largest(total, usable: int, limit: int = 1 << 20) -> int:
    """Largest b >= 1 with total(b) <= usable (total grows with b); 0 when none does."""
    if total(1) > usable:
        return 0
    lo, hi = 1, 2
    while hi < limit and total(hi) <= usable:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= usable else (lo, mid)
    return lo


def largest_safe_batch(config_or_model_dir: str | os.PathLike | dict | Any, *, dtype: Any,
                       max_tokens: int, device_memory_bytes: int | str, **kwargs) -> int:
    """The largest batch whose plan fits `device_memory_bytes` per device (0: not even 1)."""
    plan = plan_memory(config_or_model_dir, dtype=dtype, batch_size=1, max_tokens=max_tokens,
                       device_memory_bytes=device_memory_bytes, **kwargs)
    return int(plan.largest_safe_batch or 0)


def plan_for_backend(model: ModelBackend, **kwargs) -> MemoryPlan:
    """`plan_memory` for a loaded backend (its HF config and dtype)."""
    try:
        cfg = model.hf_model.config
    except NotImplementedError:
        cfg = model.source
    kwargs.setdefault("dtype", model.dtype)
    kwargs.setdefault("prefill_chunk", model.prefill_chunk)
    plan = plan_memory(cfg, **kwargs)
    return replace(plan, model=str(model.source))


def choose_batch_size(model: ModelBackend, requested: int, *, max_tokens: int,
                      device_memory_bytes: int | str | None = None, n_devices: int | None = None,
                      verbose: bool = True, **kwargs) -> int:
    """Before a run: print the plan and return min(requested, largest safe batch), or raise
    `MemoryError` with the numbers when not even batch 1 fits.

    Device memory defaults to the smallest visible CUDA device and `n_devices` to the CUDA
    devices in the model's device map; without CUDA (or a remote model) nothing is enforced.
    """
    if device_memory_bytes is None and not model.remote:
        device_memory_bytes = cuda_memory_bytes()
    if n_devices is None:
        dmap = model.device_map or {}
        gpus = {str(v) for v in dmap.values() if str(v) not in ("cpu", "disk", "meta")}
        n_devices = max(1, len(gpus))
    plan = plan_for_backend(model, batch_size=requested, max_tokens=max_tokens,
                            device_memory_bytes=device_memory_bytes, n_devices=n_devices,
                            **kwargs)
    if verbose:
        print(plan)
    if plan.device_memory is None:
        return requested
    if not plan.largest_safe_batch:
        plan.require_fit()
    chosen = min(requested, plan.largest_safe_batch)
    if verbose and chosen < requested:
        print(f"batch size {requested} -> {chosen} (largest that fits)")
    return chosen


def cuda_memory_bytes() -> int | None:
    """Memory of the smallest visible CUDA device, or None without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return min(torch.cuda.get_device_properties(i).total_memory
                   for i in range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001
        return None


__all__ = ["MemoryPlan", "plan_memory", "largest_safe_batch", "plan_for_backend",
           "choose_batch_size",
           "count_parameters", "load_config", "KNOWN_CONFIGS", "parse_bytes", "dtype_bytes",
           "cuda_memory_bytes", "GiB", "MiB"]
