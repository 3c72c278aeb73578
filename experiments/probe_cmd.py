"""`lens-steer probe`: linear probes per layer on a thought cache.

    lens-steer probe --cache runs/cache --out runs/probe
    lens-steer probe --cache runs/cache --out runs/probe --control-cache runs/cache_random

Writes `metrics.json` (per-layer accuracy/balanced accuracy/macro-F1/AUROC mean ± std over
grouped folds, shuffled-label control, majority baseline, separability, `best_layer`), the
plots (layer curve, PCA/t-SNE maps, confusion matrices) and `report.md` into `--out`.
"""

from __future__ import annotations

import argparse


def _pairs(value: str):
    if value in ("auto", "all"):
        return value
    if value == "none":
        return None
    out = []
    for part in value.split(","):
        a, sep, b = part.partition(":")
        if not sep or not a or not b:
            raise argparse.ArgumentTypeError(
                f"bad pair {part!r}: use auto, all, none or label:label[,label:label]")
        out.append((a.strip(), b.strip()))
    return out


def _layers(value: str) -> list[int]:
    from experiments.cache_cmd import parse_layers

    return parse_layers([value]) or []


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "probe", help="linear probes per layer on a thought cache (separability of labels)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="thought cache directory (lens-steer cache)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--control-cache", default=None,
                   help="cache of the same traces from a control model (e.g. random weights)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (grouped)")
    p.add_argument("--C", type=float, default=0.1, help="inverse L2 strength (sklearn's C)")
    p.add_argument("--backend", default="torch", choices=("torch", "sklearn"))
    p.add_argument("--max-iter", type=int, default=100, help="L-BFGS iterations (torch)")
    p.add_argument("--pairs", type=_pairs, default="auto",
                   help="auto (SEAL pairs), all, none, or a:b,c:d")
    p.add_argument("--layers", type=_layers, default=None, help="subset, e.g. 0-3,8")
    p.add_argument("--map-layers", type=_layers, default=None,
                   help="layers for PCA/t-SNE maps (default: the best layer)")
    p.add_argument("--no-tsne", action="store_true", help="PCA maps only")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the fits (default: torch's; 1 is faster on a busy CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from probes import probe_cache

    report = probe_cache(
        args.cache, out_dir=args.out, control_cache=args.control_cache, n_folds=args.folds,
        C=args.C, backend=args.backend, max_iter=args.max_iter, pairs=args.pairs,
        layers=args.layers or None, map_layers=args.map_layers or "best",
        tsne=not args.no_tsne, num_threads=args.threads, seed=args.seed,
        progress=not args.no_progress)
    best = report.layer(report.best_layer)
    print(f"[probe] best layer {report.best_layer}: accuracy {best['accuracy_mean']:.3f} "
          f"(control {best.get('control_accuracy_mean', float('nan')):.3f}, majority "
          f"{best['majority_accuracy_mean']:.3f}); report: {args.out}/report.md")
    return 0
