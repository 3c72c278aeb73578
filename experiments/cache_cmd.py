"""`lens-steer cache`: per-thought `resid_post` activations of reasoning traces, to disk.

    lens-steer cache --model toy --traces traces.jsonl --out runs/cache --layers 0 2
    lens-steer cache --model DIR --traces traces.jsonl --out runs/cache --layers 10-20

The traces file has one JSON object per line with `text` or `token_ids`, optional `id` and
`correct`. Rerun the same command after an interruption to resume.
"""

from __future__ import annotations

import argparse
import json


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
                raise argparse.ArgumentTypeError(
                    f"bad layer {part!r}: use integers, commas and ranges like 0 2,4 6-8"
                ) from None
    return sorted(set(layers))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cache", help="cache resid_post at thought positions of reasoning traces",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="'toy', a local HF model directory, or a hub id")
    p.add_argument("--traces", required=True, help="JSONL: text or token_ids, optional id/correct")
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--layers", nargs="+", default=None,
                   help="layers to keep, e.g. 0 2 or 4-8 (default: all)")
    p.add_argument("--backend", default="transformer_lens", choices=("transformer_lens", "nnsight"))
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=4096, help="truncate longer traces")
    p.add_argument("--shard-size", type=int, default=2048, help="thoughts per shard")
    p.add_argument("--whole-trace", action="store_true",
                   help="use thoughts outside <think>...</think> too")
    p.add_argument("--labeler", default="seal", help="name in lens_steer.thoughts.LABELERS")
    p.add_argument("--dtype", default=None, help="stored dtype, e.g. float16 (default: model's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a cache of other traces/settings in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lens_steer import load_model
    from lens_steer.cache import CacheConfig, cache_thoughts
    from lens_steer.io import read_jsonl

    traces = read_jsonl(args.traces)
    if not traces:
        raise SystemExit(f"{args.traces} holds no traces: one JSON object per line with "
                         "'text' or 'token_ids'")
    config = CacheConfig(
        layers=parse_layers(args.layers), batch_size=args.batch_size,
        max_tokens=args.max_tokens, shard_size=args.shard_size,
        think_only=not args.whole_trace, labeler=args.labeler, dtype=args.dtype,
        progress=not args.no_progress)
    model = load_model(args.model, backend=args.backend, device=args.device)
    summary = cache_thoughts(model, traces, args.out, config, overwrite=args.overwrite)
    print(json.dumps(summary.to_dict(), indent=2))
    return 0
