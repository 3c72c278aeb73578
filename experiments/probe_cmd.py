"""`lens-steer probe`: linear probes per layer on a thought cache.

    lens-steer probe --cache runs/cache --out runs/probe
    lens-steer probe --cache runs/cache --out runs/probe --control-cache runs/cache_random

Writes `metrics.json` (per-layer accuracy/balanced accuracy/macro-F1/AUROC mean ± std over
grouped folds, shuffled-label control, majority baseline, separability, `best_layer`), the
plots (layer curve, PCA/t-SNE maps, confusion matrices) and `report.md` into `--out`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from experiments.config import ConfigBase, field, register_command
from experiments.run_folder import check_writable
from lens_steer.errors import ConfigError


def _pairs(value: str):
    if value in ("auto", "all"):
        return value
    if value == "none":
        return None
    out = []
    for part in value.split(","):
        a, sep, b = part.partition(":")
        if not sep or not a or not b:
            raise ConfigError(
                f"bad pair {part!r}: use auto, all, none or label:label[,label:label]")
        out.append((a.strip(), b.strip()))
    return out


def _layers(values: list[str]) -> list[int]:
    from experiments.cache_cmd import parse_layers

    return parse_layers(values) or []


@dataclasses.dataclass
class ProbeCommandConfig(ConfigBase):
    """probe"""

    cache: str = field()
    """Thought cache directory (lens-steer cache)."""
    out: str = field()
    """Output directory."""
    control_cache: str | None = None
    """Cache of the same traces from a control model (e.g. random weights)."""
    folds: int = field(5, minimum=2)
    """Cross-validation folds (grouped by trace)."""
    C: float = field(0.1, minimum=0)
    """Inverse L2 strength (sklearn's C)."""
    backend: str = field("torch", choices=("torch", "sklearn"))
    """Probe fitter: torch (L-BFGS) or sklearn."""
    max_iter: int = field(100, minimum=1)
    """L-BFGS iterations (torch)."""
    pairs: Any = field("auto", parse=lambda v: _pairs(",".join(v)))
    """auto (SEAL pairs), all, none, or a:b,c:d."""
    layers: list[int] | None = field(None, parse=_layers)
    """Subset of layers, e.g. 0-3,8 (default: all)."""
    map_layers: list[int] | None = field(None, parse=_layers)
    """Layers for PCA/t-SNE maps (default: the best layer)."""
    tsne: bool = True
    """Draw t-SNE maps besides PCA."""
    threads: int | None = field(None, minimum=0)
    """Torch threads for the fits (default: torch's; 1 is faster on a busy CPU)."""
    seed: int = 0
    """Seed of the folds and fits."""
    progress: bool = True
    """Show a progress bar."""


def register(subparsers) -> None:
    register_command(subparsers, "probe", "linear probes per layer on a thought cache "
                     "(separability of labels)", ProbeCommandConfig, run, run_folder=False)


def run(cfg: ProbeCommandConfig) -> int:
    from probes import probe_cache

    check_writable(cfg.out)
    report = probe_cache(
        cfg.cache, out_dir=cfg.out, control_cache=cfg.control_cache, n_folds=cfg.folds,
        C=cfg.C, backend=cfg.backend, max_iter=cfg.max_iter, pairs=cfg.pairs,
        layers=cfg.layers or None, map_layers=cfg.map_layers or "best",
        tsne=cfg.tsne, num_threads=cfg.threads, seed=cfg.seed, progress=cfg.progress)
    best = report.layer(report.best_layer)
    print(f"[probe] best layer {report.best_layer}: accuracy {best['accuracy_mean']:.3f} "
          f"(control {best.get('control_accuracy_mean', float('nan')):.3f}, majority "
          f"{best['majority_accuracy_mean']:.3f}); report: {cfg.out}/report.md")
    return 0
