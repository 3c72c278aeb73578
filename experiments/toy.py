"""`lens-steer toy train|eval`: reproduce the shipped toy reasoner and measure it."""

from __future__ import annotations

import argparse
import dataclasses
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    from lens_steer.toy.splits import EVAL_SEED
    from lens_steer.toy.train import TrainConfig, field_docs

    parser = subparsers.add_parser("toy", help="train or evaluate the toy reasoner")
    sub = parser.add_subparsers(dest="toy_command", metavar="ACTION", required=True)

    tr = sub.add_parser("train", help="train the toy reasoner from its seed (<= 20 min, 2 CPUs)")
    docs = field_docs(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        default = f.default
        flag = f"--{f.name.replace('_', '-')}"
        help_ = docs.get(f.name, "").replace("%", "%%")
        kind = {"int": int, "float": float, "str": str, "str | None": str}.get(str(f.type))
        if str(f.type) == "bool":
            tr.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                            help=help_)
        elif kind is not None:
            tr.add_argument(flag, type=kind, default=default, help=help_)
        else:  # optional floats
            tr.add_argument(flag, type=float, default=default, help=help_)
    tr.add_argument("--eval-n", type=int, default=0,
                    help="after training, evaluate on this many held-out problems (0 = skip)")
    tr.add_argument("--recipe", choices=["single", "shipped"], default="shipped",
                    help="shipped (default): the three-stage recipe that reproduces the shipped "
                         "model (only --out-dir is used); single: one run with the options above")
    tr.add_argument("--ship", action="store_true",
                    help="copy the result (and its eval metrics) into lens_steer/toy/weights/")
    tr.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="greedy accuracy and thought mix on held-out problems")
    ev.add_argument("--model", default="toy", help='model directory, or "toy" (the shipped one)')
    ev.add_argument("--n", type=int, default=500, help="held-out problems")
    ev.add_argument("--seed", type=int, default=EVAL_SEED, help="seed of the held-out problems")
    ev.add_argument("--out", required=True, help="folder for metrics.json and records.jsonl")
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from lens_steer.io import write_json
    from lens_steer.eval.toy import evaluate
    from lens_steer.toy.train import TrainConfig, ship, train, train_recipe

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    if args.recipe == "shipped":
        changed = [f"--{k.replace('_', '-')}" for k, v in dataclasses.asdict(cfg).items()
                   if k != "out_dir" and v != getattr(TrainConfig, k, v)]
        if changed:
            raise SystemExit(f"toy train: {', '.join(changed)} only apply to a single run; "
                             "add --recipe single (the shipped recipe fixes every stage)")
    path = train_recipe(cfg.out_dir) if args.recipe == "shipped" else train(cfg)
    print(f"saved {path}")
    metrics = None
    if args.eval_n:
        metrics = evaluate(path, n=args.eval_n, out_dir=path / "eval")
        write_json(path / "eval_metrics.json", metrics)
        print(json.dumps({k: metrics[k] for k in ("accuracy", "mean_tokens",
                                                   "thoughts_per_trace")}, indent=2))
    if args.ship:
        print(f"shipped to {ship(path, metrics)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from lens_steer.eval.toy import evaluate

    metrics = evaluate(args.model, n=args.n, seed=args.seed, out_dir=args.out,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(json.dumps({k: metrics[k] for k in ("accuracy", "mean_tokens", "thoughts_per_trace",
                                               "by_correctness")}, indent=2))
    return 0
