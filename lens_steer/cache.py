"""Per-thought activation cache: `resid_post` at thought positions only, streamed to disk.

For every trace, `segment_thoughts` finds the thought positions (the delimiter token opening
each thought); batched forward passes through `ModelBackend.capture_resid` keep the residual
stream after each chosen block at those positions only, so memory is
O(thoughts x layers x d_model) and the full activation cache never exists. Sequences are cut
after their last thought position (a causal LM's activations there do not depend on later
tokens), which also skips the answer after `</think>`.

On disk (`out_dir`), every file written atomically:

    manifest.json              config, model info, layers, progress cursor, summary (commit point)
    shard-00000.safetensors    {"layer_<l>": Float[Tensor, "thought d_model"]} per chosen layer
    shard-00000.jsonl          one metadata row per thought, same order

Shards hold exactly `shard_size` thoughts (the last fewer), in a deterministic order, so an
interrupted run resumes from the manifest's cursor (restarting at the batch that holds it, so
the same batches are recomputed) without losing or duplicating thoughts.

    summary = cache_thoughts(model, [{"text": ..., "id": "q1", "correct": True}], "runs/cache")
    cache = load_cache("runs/cache")
    cache.activations(12)           # Float[Tensor, "thought d_model"], loaded lazily per layer
    cache.metadata[0]               # {"trace_id": "q1", "thought_index": 0, "label": ...}
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from lens_steer.io import read_json, read_jsonl, save_tensors, write_json, write_jsonl
from lens_steer.thoughts import (
    LABELS,
    Thought,
    count_by_label,
    counted_regions,
    delimiter_token_ids,
    resolve_labeler,
    segment_thoughts,
)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
METADATA_KEYS = ("trace_id", "thought_index", "position", "label", "text", "correct",
                 "n_tokens")


@dataclass
class CacheConfig:
    """What to cache and how to batch it."""

    layers: Sequence[int] | None = None
    """Blocks whose `resid_post` is kept; None = all layers."""
    batch_size: int = 8
    """Traces per forward pass (left-padded)."""
    max_tokens: int = 4096
    """Longer traces are truncated to their first `max_tokens` tokens, with a warning."""
    shard_size: int = 2048
    """Thoughts per shard file (the last shard holds the rest)."""
    think_only: bool = True
    """Only thoughts inside `<think>`...`</think>` when a trace has one."""
    labeler: str = "seal"
    """Name in `lens_steer.thoughts.LABELERS` (or pass `labeler=` a callable to cache_thoughts)."""
    dtype: str | None = None
    """Stored dtype ("float16", "bfloat16", "float32"); None keeps what the backend returns."""
    sort_by_length: bool = True
    """Batch traces of similar length together (less padding); order is still deterministic."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_tokens", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"CacheConfig.{name} must be >= 1")
        if self.layers is not None:
            self.layers = [int(layer) for layer in self.layers]
            if not self.layers:
                raise ValueError("CacheConfig.layers is empty: pass None for all layers")
        if self.dtype is not None and not isinstance(getattr(torch, self.dtype, None),
                                                     torch.dtype):
            raise ValueError(f"unknown dtype {self.dtype!r}; use e.g. 'float16' or 'float32'")


@dataclass
class CacheSummary:
    """What a cache run did (also stored in the manifest)."""

    out_dir: str
    n_traces: int
    n_thoughts: int
    thoughts_by_label: dict[str, int]
    tokens_by_label: dict[str, int]
    n_no_delimiter: int
    """Traces with no delimiter token in the counted region (they contribute nothing)."""
    n_without_thoughts: int
    """Traces contributing no thought (no delimiter, or only empty segments)."""
    n_truncated: int
    """Traces longer than `max_tokens`, truncated."""
    layers: list[int]
    n_shards: int
    resumed: bool = False
    """True when this call continued an interrupted run (or found it complete)."""
    wall_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Trace:
    index: int
    """Position in the input."""
    id: Any
    ids: list[int]
    correct: bool | None
    thoughts: list[Thought]
    truncated: bool
    has_delimiter: bool


def _prepare(model: Any, traces: Iterable[Any], config: CacheConfig, labeler: Callable
             ) -> list[_Trace]:
    """Tokenize (when needed), truncate and segment every trace."""
    delimiters = delimiter_token_ids(model.tokenizer)
    out: list[_Trace] = []
    for i, trace in enumerate(traces):
        if isinstance(trace, str):
            trace = {"text": trace}
        elif not isinstance(trace, dict):
            trace = {"token_ids": trace}
        if trace.get("token_ids") is not None:
            ids = [int(t) for t in trace["token_ids"]]
        elif trace.get("text") is not None:
            ids = model.encode(trace["text"])
        else:
            raise ValueError(f"trace {i} has neither 'text' nor 'token_ids': give one of them")
        truncated = len(ids) > config.max_tokens
        ids = ids[:config.max_tokens]
        thoughts = segment_thoughts(ids, model.tokenizer, think_only=config.think_only,
                                    labeler=labeler)
        has_delimiter = bool(thoughts) or any(
            ids[p] in delimiters for lo, hi in counted_regions(
                ids, model.tokenizer, think_only=config.think_only) for p in range(lo, hi))
        out.append(_Trace(i, trace.get("id", i), ids, trace.get("correct"), thoughts,
                          truncated, has_delimiter))
    if not out:
        raise ValueError("no traces to cache: pass at least one trace")
    return out


def _fingerprint(model_info: dict, traces: list[_Trace], layers: list[int], config: CacheConfig,
                 labeler_name: str) -> str:
    """Hash of everything that decides the shards' content (not batch size or progress)."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in model_info.items() if k != "backend"},
                        sort_keys=True, default=str).encode())
    h.update(json.dumps([layers, config.max_tokens, config.shard_size, config.think_only,
                         labeler_name, config.dtype, config.sort_by_length]).encode())
    for t in traces:
        h.update(json.dumps([t.id, t.correct]).encode())
        h.update(torch.tensor(t.ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def _summary(out_dir: Path, traces: list[_Trace], layers: list[int], n_shards: int,
             resumed: bool, wall: float) -> CacheSummary:
    thoughts = [th for t in traces for th in t.thoughts]
    tokens = dict.fromkeys(count_by_label([]), 0)
    for th in thoughts:
        tokens[th.label] = tokens.get(th.label, 0) + th.n_tokens
    return CacheSummary(
        out_dir=str(out_dir), n_traces=len(traces), n_thoughts=len(thoughts),
        thoughts_by_label=count_by_label(th.label for th in thoughts), tokens_by_label=tokens,
        n_no_delimiter=sum(not t.has_delimiter for t in traces),
        n_without_thoughts=sum(not t.thoughts for t in traces),
        n_truncated=sum(t.truncated for t in traces), layers=layers, n_shards=n_shards,
        resumed=resumed, wall_time_s=wall)


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def cache_thoughts(model: Any, traces: Iterable[Any], out_dir: str | Path,
                   config: CacheConfig | None = None, *,
                   labeler: Callable[[str], str] | None = None, overwrite: bool = False
                   ) -> CacheSummary:
    """Cache `resid_post` at every thought position of `traces` into `out_dir`; resumable.

    `traces`: dicts with `text` or `token_ids`, optional `id` (default: the input index) and
    `correct` (also plain strings or id lists). Rerunning with the same arguments after an
    interruption continues where the last committed shard stopped; a finished cache is returned
    as is. `labeler` overrides `config.labeler` with any `text -> label` callable.
    `overwrite` discards an existing cache in `out_dir` written with other traces or settings.
    """
    t0 = time.perf_counter()
    config = config or CacheConfig()
    out_dir = Path(out_dir)
    labeler_name = config.labeler if labeler is None else getattr(
        labeler, "__qualname__", "custom")
    label_fn = resolve_labeler(config.labeler if labeler is None else labeler)
    layers = model.validate_layers(
        range(model.n_layers) if config.layers is None else config.layers)
    items = _prepare(model, traces, config, label_fn)
    info = model.describe()
    fingerprint = _fingerprint(info, items, layers, config, labeler_name)

    # processing order: traces with thoughts, longest first (less padding, OOM shows early)
    order = [t for t in items if t.thoughts]
    if config.sort_by_length:
        order.sort(key=lambda t: -_cut(t))
    truncated = [t.id for t in items if t.truncated]
    if truncated:
        warnings.warn(
            f"{len(truncated)} trace(s) longer than max_tokens={config.max_tokens} were "
            f"truncated (ids {truncated[:5]}{' ...' if len(truncated) > 5 else ''}); raise "
            "CacheConfig.max_tokens (--max-tokens) to keep their later thoughts", stacklevel=2)

    manifest_path = out_dir / MANIFEST
    manifest = read_json(manifest_path) if manifest_path.exists() else None
    if manifest is not None and manifest.get("fingerprint") != fingerprint:
        if not overwrite:
            raise ValueError(
                f"{out_dir} holds a cache of other traces/model/settings: pass a new out_dir "
                "(--out), or overwrite=True (--overwrite) to replace it")
        manifest = None
    if manifest is None:
        for stale in out_dir.glob("shard-*"):
            stale.unlink()
        manifest = {
            "format_version": FORMAT_VERSION, "fingerprint": fingerprint, "complete": False,
            "model": info, "layers": layers, "d_model": model.d_model,
            "config": {**asdict(config), "layers": layers, "labeler": labeler_name},
            "n_traces": len(items), "shards": [], "cursor": [0, 0],
        }
        write_json(manifest_path, manifest)
        resumed = False
    else:
        resumed = True
    if manifest["complete"]:
        return CacheSummary(**{**manifest["summary"], "resumed": True,
                               "wall_time_s": time.perf_counter() - t0})

    writer = _ShardWriter(out_dir, manifest, config, layers, len(order))
    start_trace, start_thought = manifest["cursor"]
    b0 = (start_trace // config.batch_size) * config.batch_size
    bar = tqdm(total=len(order), initial=start_trace, desc="caching thoughts", unit="trace",
               disable=not config.progress)
    with torch.inference_mode():
        for lo in range(b0, len(order), config.batch_size):
            batch = order[lo:lo + config.batch_size]
            acts = model.capture_resid([t.ids[:_cut(t)] for t in batch], layers,
                                       [[th.position for th in t.thoughts] for t in batch])
            row = 0
            for k, t in enumerate(batch, start=lo):
                n = len(t.thoughts)
                skip = n if k < start_trace else (start_thought if k == start_trace else 0)
                if skip < n:
                    writer.add({layer: acts[layer][row + skip:row + n] for layer in layers},
                               [_meta(t, th, k) for th in t.thoughts[skip:]])
                row += n
            writer.flush_full(next_cursor=[lo + len(batch), 0])
            bar.update(max(0, lo + len(batch) - max(lo, start_trace)))
    bar.close()
    writer.flush_rest()
    summary = _summary(out_dir, items, layers, len(manifest["shards"]), resumed,
                       time.perf_counter() - t0)
    manifest.update(complete=True, cursor=[len(order), 0],
                    summary={**summary.to_dict(), "resumed": False, "wall_time_s": 0.0})
    write_json(manifest_path, manifest)
    return summary


def _cut(t: _Trace) -> int:
    """Tokens needed: up to the last thought position (causal: later tokens change nothing)."""
    return t.thoughts[-1].position + 1


def _meta(t: _Trace, th: Thought, k: int) -> dict[str, Any]:
    return {"trace_id": t.id, "thought_index": th.index, "position": th.position,
            "label": th.label, "text": th.text, "correct": t.correct, "n_tokens": th.n_tokens,
            "trace_index": t.index, "order": k}


class _ShardWriter:
    """Buffers thoughts; writes exactly `shard_size` per shard, then commits the manifest."""

    def __init__(self, out_dir: Path, manifest: dict, config: CacheConfig, layers: list[int],
                 n_order: int) -> None:
        self.out_dir, self.manifest, self.config, self.layers = out_dir, manifest, config, layers
        self.n_order = n_order
        self.dtype = getattr(torch, config.dtype) if config.dtype else None
        self.acts: dict[int, list[Tensor]] = {layer: [] for layer in layers}
        self.rows: list[dict] = []

    def add(self, acts: dict[int, Tensor], rows: list[dict]) -> None:
        for layer in self.layers:
            a = acts[layer].detach().to("cpu")
            self.acts[layer].append(a.to(self.dtype) if self.dtype else a)
        self.rows.extend(rows)

    def flush_full(self, next_cursor: list[int]) -> None:
        while len(self.rows) >= self.config.shard_size:
            self._write(self.config.shard_size, next_cursor)

    def flush_rest(self) -> None:
        if self.rows:
            self._write(len(self.rows), [self.n_order, 0])

    def _write(self, n: int, next_cursor: list[int]) -> None:
        k = len(self.manifest["shards"])
        name = _shard_name(k)
        tensors = {}
        for layer in self.layers:
            stacked = torch.cat(self.acts[layer])
            tensors[f"layer_{layer}"] = stacked[:n].clone()
            self.acts[layer] = [stacked[n:]]
        rows, self.rows = self.rows[:n], self.rows[n:]
        save_tensors(self.out_dir / f"{name}.safetensors", tensors,
                     metadata={"n_thoughts": str(n)})
        write_jsonl(self.out_dir / f"{name}.jsonl", rows)
        cursor = [self.rows[0]["order"], self.rows[0]["thought_index"]] if self.rows \
            else next_cursor
        # `thought_index` counts all thoughts of a trace; the cursor skips that many on resume
        self.manifest["shards"].append({"name": name, "n_thoughts": n})
        self.manifest["cursor"] = cursor
        write_json(self.out_dir / MANIFEST, self.manifest)  # the commit point


class ThoughtCache:
    """A cache written by `cache_thoughts`; activations load lazily, per layer and shard."""

    def __init__(self, out_dir: str | Path, allow_partial: bool = False) -> None:
        self.out_dir = Path(out_dir)
        path = self.out_dir / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"no thought cache at {self.out_dir} (missing {MANIFEST}): "
                                    "write one with `lens-steer cache` or cache_thoughts()")
        self.manifest = read_json(path)
        if not self.manifest["complete"] and not allow_partial:
            raise ValueError(
                f"the cache at {self.out_dir} is incomplete (interrupted): rerun cache_thoughts "
                "with the same arguments to resume it, or load_cache(..., allow_partial=True)")
        self.layers: list[int] = list(self.manifest["layers"])
        self.shards: list[dict] = list(self.manifest["shards"])
        self.metadata: list[dict] = [
            row for s in self.shards for row in read_jsonl(self.out_dir / f"{s['name']}.jsonl")]
        self._offsets = [0]
        for s in self.shards:
            self._offsets.append(self._offsets[-1] + s["n_thoughts"])

    @property
    def info(self) -> dict[str, Any]:
        """Model, layers, d_model, config and summary of the run."""
        m = self.manifest
        return {"model": m["model"], "layers": self.layers, "d_model": m["d_model"],
                "config": m["config"], "summary": m.get("summary"), "n_shards": len(self.shards)}

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def labels(self) -> list[str]:
        return [row["label"] for row in self.metadata]

    @property
    def groups(self) -> list[Any]:
        """Trace id per thought (for grouped splits: thoughts of a trace stay together)."""
        return [row["trace_id"] for row in self.metadata]

    @property
    def correct(self) -> list[bool | None]:
        return [row["correct"] for row in self.metadata]

    def __len__(self) -> int:
        return len(self.metadata)

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not in this cache (layers {self.layers}): "
                             "re-cache with --layers including it")

    def iter_shards(self, layer: int) -> Iterator[Float[Tensor, "shard_thought d_model"]]:
        """One shard's activations at a time, for datasets bigger than memory."""
        from safetensors import safe_open

        self._check_layer(layer)
        for s in self.shards:
            with safe_open(str(self.out_dir / f"{s['name']}.safetensors"), "pt") as f:
                yield f.get_tensor(f"layer_{layer}")

    def activations(self, layer: int, index: Sequence[int] | Tensor | None = None
                    ) -> Float[Tensor, "thought d_model"]:
        """`resid_post` of block `layer` for every thought (or the rows in `index`).

        Only that layer's tensors are read; with `index`, only the shards holding those rows.
        """
        self._check_layer(layer)
        if index is None:
            parts = list(self.iter_shards(layer))
            if not parts:
                return torch.empty(0, self.d_model)
            return torch.cat(parts)
        from safetensors import safe_open

        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"thought index out of range 0..{len(self) - 1}")
        offsets = torch.tensor(self._offsets)
        shard_of = torch.searchsorted(offsets, index, right=True) - 1
        out: Tensor | None = None
        for k in shard_of.unique().tolist():
            sel = (shard_of == k).nonzero().squeeze(1)
            local = index[sel] - self._offsets[k]
            with safe_open(str(self.out_dir / f"{self.shards[k]['name']}.safetensors"),
                           "pt") as f:
                sl = f.get_slice(f"layer_{layer}")
                lo, hi = int(local.min()), int(local.max()) + 1
                rows = sl[lo:hi][local - lo]
            if out is None:
                out = rows.new_empty(len(index), rows.shape[-1])
            out[sel] = rows
        return out if out is not None else torch.empty(0, self.d_model)

    def to_dict(self) -> dict[int, Float[Tensor, "thought d_model"]]:
        """{layer: activations} for every cached layer (loads everything)."""
        return {layer: self.activations(layer) for layer in self.layers}

    def label_counts(self) -> dict[str, int]:
        return count_by_label(self.labels)

    def __repr__(self) -> str:
        return (f"ThoughtCache({str(self.out_dir)!r}, thoughts={len(self)}, layers={self.layers},"
                f" labels={self.label_counts()})")


def load_cache(out_dir: str | Path, allow_partial: bool = False) -> ThoughtCache:
    """Open a cache written by `cache_thoughts` (metadata now, activations on demand)."""
    return ThoughtCache(out_dir, allow_partial=allow_partial)


__all__ = ["CacheConfig", "CacheSummary", "ThoughtCache", "cache_thoughts", "load_cache",
           "LABELS", "METADATA_KEYS"]
