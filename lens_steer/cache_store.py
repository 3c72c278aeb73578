"""The thought cache on disk: manifest, shards, the shard writer, verification, the reader.

    manifest.json              settings, fingerprint, sites, shards (+ sha256), summary: the
                               commit point, rewritten atomically after every shard
    shard-00000.safetensors    {site: Float[Tensor, "thought *feature"]} per cached site
    shard-00000.jsonl          one metadata row per thought, same order

Format 2 keys tensors by TransformerLens hook name (`blocks.3.hook_resid_post`); format 1 caches
(`layer_3` keys, resid_post only) still load. `check_shard` compares each shard with the manifest
(files present, safetensors header readable and covering the file, rows per site and metadata
rows equal to the manifest's count, and with `verify=True` the recorded sha256): the loader
refuses a damaged shard by name, and `cache_thoughts` re-writes it on resume.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lens_steer.errors import ArtifactError
from lens_steer.io import (
    describe_holder,
    live_holder,
    read_json,
    save_tensors,
    write_json,
    write_jsonl,
)
from lens_steer.thoughts import count_by_label

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
_RESID_POST = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
REPAIR = ("rerun the same cache command (cache_thoughts with the same arguments) to re-write it, "
          "or pass --overwrite (overwrite=True) to rebuild the cache")


class CacheError(ArtifactError, ValueError):
    """A cache folder is damaged, incomplete, or holds other settings (also a ValueError, as
    the cache raised before the error family existed)."""


def resid_post_site(layer: int) -> str:
    return f"blocks.{int(layer)}.hook_resid_post"


def resid_post_layer(site: str) -> int | None:
    """The block of a `resid_post` site, or None for any other site."""
    m = _RESID_POST.match(site)
    return int(m.group(1)) if m else None


def read_manifest(out_dir: Path) -> dict | None:
    """The manifest of `out_dir`, None if there is none; `CacheError` if it is damaged."""
    path = out_dir / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = read_json(path)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
            raise ValueError("not a cache manifest")
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is damaged ({e}): pass --overwrite (overwrite=True) to "
                         "rebuild the cache there, or use another folder") from None
    return manifest


def manifest_sites(manifest: dict) -> list[str]:
    if "sites" in manifest:
        return list(manifest["sites"])
    return [resid_post_site(layer) for layer in manifest["layers"]]


def tensor_key(manifest: dict, site: str) -> str:
    if manifest.get("format_version", 1) >= 2:
        return site
    return f"layer_{resid_post_layer(site)}"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_shard(out_dir: Path, manifest: dict, k: int, *, verify: bool = False
                ) -> tuple[str | None, list[dict] | None]:
    """(problem, metadata rows) of shard `k`: problem is None when the shard matches the
    manifest. Reads the safetensors header only, plus all metadata (and every byte if
    `verify` and the manifest has hashes)."""
    from safetensors import SafetensorError, safe_open

    shard = manifest["shards"][k]
    name, n = shard["name"], int(shard["n_thoughts"])
    st, meta = out_dir / f"{name}.safetensors", out_dir / f"{name}.jsonl"
    for path in (st, meta):
        if not path.exists():
            return f"{path.name} is missing", None
    try:
        with safe_open(str(st), "pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        return f"{st.name} is unreadable ({e})", None
    feature = manifest.get("shapes", {})
    for site in manifest_sites(manifest):
        shape = shapes.get(tensor_key(manifest, site))
        if shape is None:
            return f"{st.name} has no tensor for {site}", None
        if shape[0] != n:
            return f"{st.name} holds {shape[0]} rows of {site}, the manifest says {n}", None
        if site in feature and list(shape[1:]) != list(feature[site]):
            return f"{st.name} has {site} of shape {shape}, the manifest says {feature[site]}", None
    rows: list[dict] = []
    with open(meta, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                return f"{meta.name} line {i} is not JSON (cut short?)", None
    if len(rows) != n:
        return f"{meta.name} has {len(rows)} rows, the manifest says {n}", None
    if verify and shard.get("sha256"):
        for path in (st, meta):
            if file_sha256(path) != shard["sha256"].get(path.suffix.lstrip(".")):
                return f"{path.name} differs from its sha256 in the manifest", None
    return None, rows


# -- writing ---------------------------------------------------------------------------------
def cache_files(out_dir: Path) -> list[str]:
    """This cache's files in `out_dir`, manifest first (the commit point), then shards and
    temp files of interrupted writes; never the lock or unrelated files."""
    names = [MANIFEST] if (out_dir / MANIFEST).exists() else []
    names += sorted(p.name for p in out_dir.glob("shard-*.safetensors"))
    names += sorted(p.name for p in out_dir.glob("shard-*.jsonl"))
    names += sorted(p.name for p in out_dir.glob(f".{MANIFEST}.*.tmp"))
    return names + sorted(p.name for p in out_dir.glob(".shard-*.tmp"))


def drop_damaged(out_dir: Path, manifest: dict, verify: bool) -> list[str]:
    """Cut the manifest's shard list before the first damaged shard; their names."""
    for k in range(len(manifest["shards"])):
        problem, _ = check_shard(out_dir, manifest, k, verify=verify)
        if problem:
            names = [s["name"] for s in manifest["shards"][k:]]
            warnings.warn(f"cache {out_dir}: {problem}; re-writing shards {names[0]}.."
                          f"{names[-1]}", stacklevel=3)
            del manifest["shards"][k:]
            return names
    return []


class ShardWriter:
    """Buffers thoughts; writes exactly `shard_size` per shard, then commits the manifest."""

    def __init__(self, out_dir: Path, manifest: dict, sites: list[str], shard_size: int,
                 dtype: str | None) -> None:
        self.out_dir, self.manifest, self.sites = out_dir, manifest, sites
        self.shard_size, self.dtype_name = shard_size, dtype
        self.dtype = getattr(torch, dtype) if dtype else None
        self.acts: dict[str, list[Tensor]] = {s: [] for s in sites}
        self.rows: list[dict] = []

    def add(self, acts: dict[str, Tensor], rows: list[dict]) -> None:
        for s in self.sites:
            a = acts[s].detach().to("cpu")
            a = a.to(self.dtype) if self.dtype else a
            if not torch.isfinite(a).all():
                bad = sorted({r["trace_id"] for r, ok in zip(
                    rows, torch.isfinite(a.flatten(1)).all(1).tolist(), strict=True) if not ok})
                raise ArtifactError(
                    f"non-finite activations (NaN/inf) at {s} for traces {bad[:5]}"
                    f"{self.dtype_name and f' after casting to {self.dtype_name}' or ''}: "
                    "nothing was written for them; load the model in float32/bfloat16 or store "
                    "a wider dtype (--dtype float32), then rerun")
            self.acts[s].append(a)
        self.rows.extend(rows)

    def flush_full(self) -> None:
        while len(self.rows) >= self.shard_size:
            self._write(self.shard_size)

    def flush_rest(self) -> None:
        if self.rows:
            self._write(len(self.rows))

    def _write(self, n: int) -> None:
        name = f"shard-{len(self.manifest['shards']):05d}"
        tensors = {}
        for s in self.sites:
            stacked = torch.cat(self.acts[s])
            tensors[s] = stacked[:n].clone()
            self.acts[s] = [stacked[n:]]
            self.manifest["shapes"].setdefault(s, list(stacked.shape[1:]))
        rows, self.rows = self.rows[:n], self.rows[n:]
        st = save_tensors(self.out_dir / f"{name}.safetensors", tensors,
                          metadata={"n_thoughts": str(n)})
        meta = write_jsonl(self.out_dir / f"{name}.jsonl", rows)
        self.manifest["shards"].append({"name": name, "n_thoughts": n, "sha256": {
            "safetensors": file_sha256(st), "jsonl": file_sha256(meta)}})
        self.manifest["cursor"] = [rows[-1]["order"], rows[-1]["thought_index"] + 1]
        write_json(self.out_dir / MANIFEST, self.manifest)  # the commit point


# -- reading ---------------------------------------------------------------------------------
class ThoughtCache:
    """A cache written by `cache_thoughts`; activations load lazily, per site and shard.

    Sites are TransformerLens hook names; an int stands for `blocks.<int>.hook_resid_post`, so
    `cache.activations(12)` and `cache.layers` work as for the resid_post-only caches of before.
    Opening checks every shard against the manifest (row counts, readable files; sha256 too with
    `verify=True`) and names the damaged shard and the fix.
    """

    def __init__(self, out_dir: str | Path, allow_partial: bool = False, verify: bool = False
                 ) -> None:
        self.out_dir = Path(out_dir)
        manifest = read_manifest(self.out_dir)
        if manifest is None:
            raise FileNotFoundError(f"no thought cache at {self.out_dir} (missing {MANIFEST}): "
                                    "write one with `lens-steer cache` or cache_thoughts()")
        self.manifest = manifest
        if not manifest.get("complete") and not allow_partial:
            holder = live_holder(self.out_dir)
            busy = f"; it is being written by {describe_holder(holder)}" if holder else ""
            raise CacheError(
                f"the cache at {self.out_dir} is incomplete (interrupted{busy}): rerun "
                "cache_thoughts with the same arguments to resume it, or "
                "load_cache(..., allow_partial=True)")
        self.sites: list[str] = manifest_sites(manifest)
        self.layers: list[int] = [layer for s in self.sites
                                  if (layer := resid_post_layer(s)) is not None]
        self.shards: list[dict] = list(manifest["shards"])
        self.metadata: list[dict] = []
        for k, s in enumerate(self.shards):
            problem, rows = check_shard(self.out_dir, manifest, k, verify=verify)
            if problem:
                raise CacheError(f"cache {self.out_dir}: shard {s['name']} is damaged: "
                                 f"{problem}: {REPAIR}")
            self.metadata.extend(rows)
        self._offsets = [0]
        for s in self.shards:
            self._offsets.append(self._offsets[-1] + s["n_thoughts"])

    @property
    def info(self) -> dict[str, Any]:
        """Model, sites, layers, d_model, config and summary of the run."""
        m = self.manifest
        return {"model": m["model"], "sites": self.sites, "layers": self.layers,
                "d_model": m["d_model"], "config": m["config"], "summary": m.get("summary"),
                "n_shards": len(self.shards)}

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

    def site(self, site: str | int) -> str:
        """The site name of `site` (an int means that block's resid_post); checked."""
        name = resid_post_site(site) if isinstance(site, int) else str(site)
        if name not in self.sites:
            raise CacheError(f"{'layer ' + str(site) if isinstance(site, int) else site} is not "
                             f"in this cache (sites {self.sites}): re-cache with --layers or "
                             "sites including it")
        return name

    def feature_shape(self, site: str | int) -> tuple[int, ...]:
        """Per-thought shape at `site` ((d_model,) for residual sites, (heads, d_head) for z)."""
        name = self.site(site)
        shape = self.manifest.get("shapes", {}).get(name)
        return tuple(shape) if shape is not None else (self.d_model,)

    def _key(self, site: str | int) -> str:
        return tensor_key(self.manifest, self.site(site))

    def iter_shards(self, site: str | int) -> Iterator[Float[Tensor, "shard_thought *feature"]]:
        """One shard's activations at a time, for datasets bigger than memory."""
        from safetensors import safe_open

        key = self._key(site)
        for s in self.shards:
            with safe_open(str(self.out_dir / f"{s['name']}.safetensors"), "pt") as f:
                yield f.get_tensor(key)

    def activations(self, site: str | int, index: Sequence[int] | Tensor | None = None
                    ) -> Float[Tensor, "thought *feature"]:
        """Activations at `site` (a hook name, or an int for that block's `resid_post`) for
        every thought, or the rows in `index`. Only that site's tensors are read; with `index`,
        only the shards holding those rows."""
        from safetensors import safe_open

        key = self._key(site)
        empty = torch.empty(0, *self.feature_shape(site))
        if index is None:
            parts = list(self.iter_shards(site))
            return torch.cat(parts) if parts else empty
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
                sl = f.get_slice(key)
                lo, hi = int(local.min()), int(local.max()) + 1
                rows = sl[lo:hi][local - lo]
            if out is None:
                out = rows.new_empty(len(index), *rows.shape[1:])
            out[sel] = rows
        return out if out is not None else empty

    def to_dict(self, by: str = "layer") -> dict[Any, Float[Tensor, "thought *feature"]]:
        """Everything, loaded: {layer: resid_post} (by="layer"), or {site: acts} (by="site")."""
        if by == "site":
            return {site: self.activations(site) for site in self.sites}
        if by != "layer":
            raise ValueError(f"by must be 'layer' or 'site', not {by!r}")
        return {layer: self.activations(layer) for layer in self.layers}

    def label_counts(self) -> dict[str, int]:
        return count_by_label(self.labels)

    def __repr__(self) -> str:
        return (f"ThoughtCache({str(self.out_dir)!r}, thoughts={len(self)}, sites={self.sites},"
                f" labels={self.label_counts()})")


def load_cache(out_dir: str | Path, allow_partial: bool = False, verify: bool = False
               ) -> ThoughtCache:
    """Open a cache written by `cache_thoughts` (metadata now, activations on demand).

    Every shard is checked against the manifest; `verify=True` also checks its sha256."""
    return ThoughtCache(out_dir, allow_partial=allow_partial, verify=verify)
