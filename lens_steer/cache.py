"""Per-thought activation cache: chosen sites at thought positions only, streamed to disk.

For every trace, `segment_thoughts` finds the thought positions (the delimiter token opening
each thought); batched forward passes keep the activations at the chosen sites (TransformerLens
hook names; default `blocks.L.hook_resid_post` of the chosen layers) at those positions only, so
memory is O(thoughts x sites x d_model) and the full activation cache never exists. Sequences are
cut after their last thought position (a causal LM's activations there do not depend on later
tokens), which also skips the answer after `</think>`. The format on disk and the reader are in
`lens_steer.cache_store`.

Shards hold exactly `shard_size` thoughts (the last fewer) in a deterministic order, so an
interrupted run resumes after its last committed shard without losing or duplicating thoughts.
A run holds the folder's lock (`lens_steer.io.folder_lock`): a second writer is refused, naming
the holder. A resume first checks every committed shard against the manifest and re-writes from
the first damaged one; a folder of other settings is refused, naming the settings that differ.

    summary = cache_thoughts(model, [{"text": ..., "id": "q1", "correct": True}], "runs/cache")
    cache = load_cache("runs/cache")
    cache.activations(12)           # Float[Tensor, "thought d_model"]: resid_post of block 12
    cache.activations("blocks.2.hook_attn_out")   # any cached site
    cache.metadata[0]               # {"trace_id": "q1", "thought_index": 0, "label": ...}
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lens_steer.cache_store import (
    FORMAT_VERSION,
    MANIFEST,
    CacheError,
    ShardWriter,
    ThoughtCache,
    cache_files,
    check_shard,
    drop_damaged,
    load_cache,
    read_manifest,
    resid_post_layer,
    resid_post_site,
)
from lens_steer.errors import ConfigError, DataError
from lens_steer.fingerprint import differing_keys, digest, labeller_fingerprint
from lens_steer.io import discard, folder_lock, write_json
from lens_steer.thoughts import (
    LABELS,
    Thought,
    count_by_label,
    counted_regions,
    delimiter_token_ids,
    resolve_labeler,
    segment_thoughts,
)

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend

METADATA_KEYS = ("trace_id", "thought_index", "position", "label", "text", "correct",
                 "n_tokens")


@dataclass
class CacheConfig:
    """What to cache and how to batch it."""

    layers: Sequence[int] | None = None
    """Blocks whose `resid_post` is kept; None = all layers (unless `sites` is given)."""
    sites: Sequence[str] | None = None
    """TransformerLens hook names to keep instead (e.g. `blocks.2.hook_resid_pre`,
    `blocks.1.hook_attn_out`, `blocks.0.attn.hook_z`); give `layers` or `sites`, not both."""
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
                raise ConfigError(f"CacheConfig.{name} must be >= 1")
        if self.layers is not None:
            self.layers = [int(layer) for layer in self.layers]
            if not self.layers:
                raise ConfigError("CacheConfig.layers is empty: pass None for all layers")
        if self.sites is not None:
            self.sites = [str(site) for site in self.sites]
            if not self.sites or self.layers is not None:
                raise ConfigError("CacheConfig: give a non-empty `sites` or `layers`, not both")
            bad = [s for s in self.sites if s.endswith("hook_pattern")]
            if bad or len(set(self.sites)) != len(self.sites):
                raise ConfigError(f"CacheConfig.sites: {bad or 'duplicates'} cannot be cached "
                                  "(attention patterns vary in width; list each site once)")
        if self.dtype is not None and not isinstance(getattr(torch, self.dtype, None),
                                                     torch.dtype):
            raise ConfigError(f"unknown dtype {self.dtype!r}; use e.g. 'float16' or 'float32'")


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
    sites: list[str] | None = None
    repaired: list[str] | None = None
    """Shards found damaged on resume and written again."""

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


def _prepare(model: ModelBackend, traces: Iterable[Any], config: CacheConfig, labeler: Callable
             ) -> list[_Trace]:
    """Tokenize (when needed), truncate and segment every trace."""
    delimiters = delimiter_token_ids(model.tokenizer)
    vocab = len(model.tokenizer)
    out: list[_Trace] = []
    for i, trace in enumerate(traces):
        if isinstance(trace, str):
            trace = {"text": trace}
        elif not isinstance(trace, dict):
            trace = {"token_ids": trace}
        if trace.get("token_ids") is not None:
            ids = [int(t) for t in trace["token_ids"]]
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise DataError(
                    f"trace {trace.get('id', i)!r} has token ids outside the tokenizer's "
                    f"0..{vocab - 1}: {bad[:5]}: tokenize the traces with this model's "
                    "tokenizer (or give 'text')")
        elif trace.get("text") is not None:
            ids = model.encode(trace["text"])
        else:
            raise ConfigError(f"trace {i} has neither 'text' nor 'token_ids': give one of them")
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
        raise ConfigError("no traces to cache: pass at least one trace")
    return out


def _settings(model_info: dict, traces: list[_Trace], sites: list[str], config: CacheConfig,
              labeler: Any) -> dict[str, Any]:
    """Everything that decides the shards' content (not batch size or progress), by name."""
    settings = {"model": {k: v for k, v in model_info.items() if k != "backend"},
                "traces": _hash_traces(hashlib.sha256(), traces).hexdigest(),
                "n_traces": len(traces), "sites": sites,
                "max_tokens": config.max_tokens, "shard_size": config.shard_size,
                "think_only": config.think_only, "labeler": labeller_fingerprint(labeler),
                "dtype": config.dtype, "sort_by_length": config.sort_by_length}
    return json.loads(json.dumps(settings, default=repr))  # as the manifest will hold it


def _legacy_fingerprint(model_info: dict, traces: list[_Trace], sites: list[str],
                        config: CacheConfig, labeler: Any) -> str | None:
    """The format-1 fingerprint, so finished caches of older versions are still recognised."""
    layers = [resid_post_layer(s) for s in sites]
    if None in layers:
        return None
    labeler_name = labeler if isinstance(labeler, str) else getattr(
        labeler, "__qualname__", "custom")
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in model_info.items() if k != "backend"},
                        sort_keys=True, default=str).encode())
    h.update(json.dumps([layers, config.max_tokens, config.shard_size, config.think_only,
                         labeler_name, config.dtype, config.sort_by_length]).encode())
    return _hash_traces(h, traces).hexdigest()


def _hash_traces(h: Any, traces: list[_Trace]) -> Any:
    """`h` updated with every trace's id, correctness and token ids (in input order)."""
    for t in traces:
        h.update(json.dumps([t.id, t.correct]).encode())
        h.update(torch.tensor(t.ids, dtype=torch.int64).numpy().tobytes())
    return h


def _resolve_sites(model: ModelBackend, config: CacheConfig) -> list[str]:
    """Canonical hook names of the sites to cache, checked against the model before any work."""
    if config.sites is None:
        layers = model.validate_layers(
            range(model.n_layers) if config.layers is None else config.layers)
        return [resid_post_site(layer) for layer in layers]
    sites = [site.name for site in model.validate_sites(config.sites)]
    if len(set(sites)) != len(sites):
        raise ConfigError(f"CacheConfig.sites names a site twice: {config.sites}")
    return sites


def _capture(model: ModelBackend, seqs: list[list[int]], sites: list[str],
             positions: list[list[int]]) -> dict[str, Tensor]:
    """{site: (rows, *feature)}; the resid_post-only path goes through `capture_resid`."""
    layers = [resid_post_layer(s) for s in sites]
    if all(layer is not None for layer in layers):
        acts = model.capture_resid(seqs, layers, positions)
        return {s: acts[layer] for s, layer in zip(sites, layers, strict=True)}
    return model.capture(seqs, sites, positions)


def _summary(out_dir: Path, traces: list[_Trace], sites: list[str], n_shards: int,
             resumed: bool, wall: float) -> CacheSummary:
    thoughts = [th for t in traces for th in t.thoughts]
    tokens = dict.fromkeys(count_by_label([]), 0)
    for th in thoughts:
        tokens[th.label] = tokens.get(th.label, 0) + th.n_tokens
    layers = [layer for s in sites if (layer := resid_post_layer(s)) is not None]
    return CacheSummary(
        out_dir=str(out_dir), n_traces=len(traces), n_thoughts=len(thoughts),
        thoughts_by_label=count_by_label(th.label for th in thoughts), tokens_by_label=tokens,
        n_no_delimiter=sum(not t.has_delimiter for t in traces),
        n_without_thoughts=sum(not t.thoughts for t in traces),
        n_truncated=sum(t.truncated for t in traces), layers=layers, n_shards=n_shards,
        resumed=resumed, wall_time_s=wall, sites=sites)


def _cursor_at(order: list[_Trace], n_rows: int) -> list[int]:
    """[trace k in `order`, thoughts of it to skip] after the first `n_rows` thoughts."""
    for k, t in enumerate(order):
        if n_rows < len(t.thoughts):
            return [k, n_rows]
        n_rows -= len(t.thoughts)
    return [len(order), 0]


def cache_thoughts(model: ModelBackend, traces: Iterable[Any], out_dir: str | Path,
                   config: CacheConfig | None = None, *,
                   labeler: Callable[[str], str] | None = None, overwrite: bool = False,
                   verify: bool = False) -> CacheSummary:
    """Cache activations at every thought position of `traces` into `out_dir`; resumable.

    `traces`: dicts with `text` or `token_ids`, optional `id` (default: the input index) and
    `correct` (also plain strings or id lists). Rerunning with the same arguments after an
    interruption continues after the last committed shard, re-writing any damaged one; a
    finished cache is checked and returned as is. `labeler` overrides `config.labeler` with any
    `text -> label` callable (fingerprinted by `labeller_fingerprint`). `overwrite` discards a
    cache of other traces or settings, or one whose manifest is damaged (a cache of the same
    settings is resumed and repaired, not rebuilt). `verify` also checks the sha256 of every
    committed shard on resume. Raises `ArtifactError` while another writer holds `out_dir`.
    """
    t0 = time.perf_counter()
    config = config or CacheConfig()
    out_dir = Path(out_dir)
    label_source = config.labeler if labeler is None else labeler
    label_fn = resolve_labeler(label_source)
    sites = _resolve_sites(model, config)
    items = _prepare(model, traces, config, label_fn)
    info = model.describe()
    settings = _settings(info, items, sites, config, label_source)
    fingerprint = digest(settings)

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

    with folder_lock(out_dir):
        try:
            manifest = read_manifest(out_dir)
        except CacheError:
            if not overwrite:
                raise
            manifest = None
        if manifest is not None and manifest.get("fingerprint") != fingerprint:
            legacy = "settings" not in manifest and manifest.get("fingerprint") == \
                _legacy_fingerprint(info, items, sites, config, label_source)
            if legacy and manifest.get("complete") and not overwrite:
                if any(check_shard(out_dir, manifest, k, verify=verify)[0]
                       for k in range(len(manifest["shards"]))):
                    raise CacheError(f"{out_dir} holds a damaged cache of an older lens_steer "
                                     "(format 1), which cannot be repaired: pass --overwrite")
                return CacheSummary(**{**manifest["summary"], "resumed": True,
                                       "wall_time_s": time.perf_counter() - t0})
            if not overwrite:
                raise CacheError(
                    f"{out_dir} holds a cache of other settings; differing: "
                    f"{', '.join(differing_keys(manifest.get('settings'), settings))}: pass a new "
                    "out_dir (--out), or overwrite=True (--overwrite) to replace it")
            manifest = None
        if manifest is None:
            discard(out_dir, cache_files(out_dir))
            manifest = {
                "format_version": FORMAT_VERSION, "fingerprint": fingerprint,
                "settings": settings, "complete": False, "model": info, "sites": sites,
                "layers": [layer for s in sites if (layer := resid_post_layer(s)) is not None],
                "d_model": model.d_model, "shapes": {},
                "config": {**asdict(config), "sites": sites, "labeler":
                           settings["labeler"].get("name") or settings["labeler"]},
                "n_traces": len(items), "shards": [], "cursor": [0, 0],
            }
            write_json(out_dir / MANIFEST, manifest)
            resumed, repaired = False, []
        else:
            discard(out_dir, [p.name for p in out_dir.glob(".*.tmp")])  # of killed writers
            resumed, repaired = True, drop_damaged(out_dir, manifest, verify)
            if not repaired and manifest["complete"]:
                return CacheSummary(**{**manifest["summary"], "resumed": True,
                                       "wall_time_s": time.perf_counter() - t0})
            manifest["complete"] = False
        _write_shards(model, order, out_dir, manifest, config, sites)
        summary = _summary(out_dir, items, sites, len(manifest["shards"]), resumed,
                           time.perf_counter() - t0)
        summary.repaired = repaired or None
        manifest.update(complete=True, cursor=[len(order), 0],
                        summary={**summary.to_dict(), "resumed": False, "wall_time_s": 0.0,
                                 "repaired": None})
        write_json(out_dir / MANIFEST, manifest)
    return summary


def _write_shards(model: ModelBackend, order: list[_Trace], out_dir: Path, manifest: dict,
                  config: CacheConfig, sites: list[str]) -> None:
    writer = ShardWriter(out_dir, manifest, sites, config.shard_size, config.dtype)
    start_trace, start_thought = _cursor_at(
        order, sum(s["n_thoughts"] for s in manifest["shards"]))
    b0 = (start_trace // config.batch_size) * config.batch_size
    bar = tqdm(total=len(order), initial=start_trace, desc="caching thoughts", unit="trace",
               disable=not config.progress)
    with torch.inference_mode():
        for lo in range(b0, len(order), config.batch_size):
            batch = order[lo:lo + config.batch_size]
            acts = _capture(model, [t.ids[:_cut(t)] for t in batch], sites,
                            [[th.position for th in t.thoughts] for t in batch])
            row = 0
            for k, t in enumerate(batch, start=lo):
                n = len(t.thoughts)
                skip = n if k < start_trace else (start_thought if k == start_trace else 0)
                if skip < n:
                    writer.add({s: acts[s][row + skip:row + n] for s in sites},
                               [_meta(t, th, k) for th in t.thoughts[skip:]])
                row += n
            writer.flush_full()
            bar.update(max(0, lo + len(batch) - max(lo, start_trace)))
    bar.close()
    writer.flush_rest()


def _cut(t: _Trace) -> int:
    """Tokens needed: up to the last thought position (causal: later tokens change nothing)."""
    return t.thoughts[-1].position + 1


def _meta(t: _Trace, th: Thought, k: int) -> dict[str, Any]:
    return {"trace_id": t.id, "thought_index": th.index, "position": th.position,
            "label": th.label, "text": th.text, "correct": t.correct, "n_tokens": th.n_tokens,
            "trace_index": t.index, "order": k}


__all__ = ["CacheConfig", "CacheSummary", "CacheError", "ThoughtCache", "cache_thoughts",
           "load_cache", "labeller_fingerprint", "LABELS", "METADATA_KEYS"]
