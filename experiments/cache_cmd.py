"""`lens-steer cache`: per-thought `resid_post` activations of reasoning traces, to disk.

    lens-steer cache --model toy --traces traces.jsonl --out runs/cache --layers 0 2
    lens-steer cache --model DIR --traces traces.jsonl --out runs/cache --layers 10-20 \
        --backend nnsight --device-map auto --dtype bf16

The traces file has one JSON object per line with `text` or `token_ids`, optional `id` and
`correct`. Rerun the same command after an interruption to resume.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from experiments.common import ModelOptions, check_layers
from experiments.config import field, register_command
from experiments.run_folder import check_writable
from lens_steer.errors import ConfigError, DataError


def parse_layers(values: list[str] | None) -> list[int] | None:
    """`["0", "2,4", "6-8"]` -> [0, 2, 4, 6, 7, 8]; None or ["all"] -> None (all layers)."""
    if not values or values == ["all"]:
        return None
    layers: list[int] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1)
                    layers.extend(range(int(lo), int(hi) + 1))
                else:
                    layers.append(int(part))
            except ValueError:
                raise ConfigError(
                    f"bad layer {part!r}: use integers, commas and ranges like 0 2,4 6-8"
                ) from None
    return sorted(set(layers))


def _labellers() -> list[str]:
    import lens_steer.thoughts  # noqa: F401 - registers the built-in labellers
    from lens_steer.registry import LABELLERS

    return LABELLERS.names()


@dataclasses.dataclass
class CacheCommandConfig(ModelOptions):
    """cache"""

    traces: str = field()
    """JSONL traces: one object per line with `text` or `token_ids`, optional `id`/`correct`."""
    out: str = field()
    """Output directory (resumable)."""
    layers: list[int] | None = field(None, parse=parse_layers)
    """Layers to keep, e.g. 0 2 or 4-8 or all (default: all)."""
    sites: list[str] | None = None
    """TransformerLens hook names to cache instead of --layers, e.g. blocks.2.hook_resid_pre."""
    batch_size: int = field(8, minimum=1)
    """Traces per forward batch."""
    max_tokens: int = field(4096, minimum=1)
    """Truncate longer traces to this many tokens."""
    shard_size: int = field(2048, minimum=1)
    """Thoughts per shard."""
    whole_trace: bool = False
    """Use thoughts outside <think>...</think> too."""
    labeler: str = field("seal", choices=_labellers)
    """Thought labeller (a name registered in lens_steer.registry.LABELLERS)."""
    store_dtype: str | None = None
    """Stored activation dtype, e.g. float16 (default: the model's)."""
    overwrite: bool = False
    """Replace a cache of other traces/settings (or a damaged manifest) in --out."""
    verify: bool = False
    """On resume, also check every committed shard's sha256 (damaged shards are re-written)."""
    progress: bool = True
    """Show a progress bar."""


def register(subparsers) -> None:
    register_command(subparsers, "cache", "cache resid_post at thought positions of reasoning "
                     "traces", CacheCommandConfig, run, run_folder=False)


def run(cfg: CacheCommandConfig) -> int:
    from lens_steer.cache import CacheConfig, cache_thoughts
    from lens_steer.io import ensure_unlocked, read_jsonl

    if not Path(cfg.traces).is_file():
        raise ConfigError(f"--traces {cfg.traces}: no such file")
    check_writable(cfg.out)
    ensure_unlocked(cfg.out)  # a held folder is refused before the model loads
    traces = read_jsonl(cfg.traces)
    if not traces:
        raise DataError(f"{cfg.traces} holds no traces: one JSON object per line with "
                        "'text' or 'token_ids'")
    config = CacheConfig(
        layers=cfg.layers, sites=cfg.sites, batch_size=cfg.batch_size, max_tokens=cfg.max_tokens,
        shard_size=cfg.shard_size, think_only=not cfg.whole_trace, labeler=cfg.labeler,
        dtype=cfg.store_dtype, progress=cfg.progress)
    model = cfg.load()
    if cfg.layers is not None:
        check_layers(model, cfg.layers, "--layers")
    summary = cache_thoughts(model, traces, cfg.out, config, overwrite=cfg.overwrite,
                             verify=cfg.verify)
    print(json.dumps(summary.to_dict(), indent=2))
    return 0
