"""`lens-steer coconut`: continuous thoughts (Coconut) vs CoT vs no-CoT on ProsQA-style problems.

    lens-steer coconut run --out runs/coconut/x                    # official schedule, whole comparison
    lens-steer coconut run --out runs/coconut/quick --n-train 200 --train.epochs 3 \
        --set train.epochs_per_stage=1                              # any TrainConfig field: train.<f>
    lens-steer coconut run --model path/to/gpt2 --out ...          # a HF causal LM and its tokenizer
    lens-steer coconut run --config runs/coconut/x/config.json --out runs/coconut/again
    lens-steer coconut train --mode cot --out runs/coconut/cot     # one model
    lens-steer coconut train --mode coconut --init runs/coconut/cot --train.stage0-epochs 0 \
        --out runs/coconut/from_cot                                 # latent stages on a CoT model
    lens-steer coconut eval --model runs/coconut/x/models/coconut --data prosqa_valid.json
    lens-steer coconut inspect --model runs/coconut/x/models/coconut --data prosqa_valid.json \
        --out runs/coconut/x/inspect-real                           # logit lens + probes

`run` and `train` take `CoconutRunConfig`'s options the way every command does
(`experiments.config`): a flag per field (`--train.<field>` for its `TrainConfig`), `--config
FILE` (a run folder's config.json), `--set key=value`; defaults < --config < --set < flags;
unknown keys are one-line errors. The output folder is locked while it is written.

The run folder holds config.json (resolved), data/*.json, models/<mode>/, metrics.json,
records.jsonl (one row per test problem and method), history.jsonl, lens.jsonl,
frontier_mass.png, probes/ and report.md. The comparison itself is `lens_steer.coconut.experiment`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.config import add_config_arguments, build_config
from lens_steer.coconut.experiment import METHODS, CoconutRunConfig, run


def _config(args: argparse.Namespace) -> CoconutRunConfig:
    """The resolved config of `coconut run|train` (see `experiments.config`)."""
    given = getattr(args, "_given", set())
    return build_config(CoconutRunConfig, preset=args.preset, config=args.config,
                        sets=args.set_values, flags={k: getattr(args, k) for k in sorted(given)},
                        command="coconut")


def _run(args: argparse.Namespace) -> int:
    from lens_steer.coconut.experiment import report_markdown
    from lens_steer.io import folder_lock

    cfg = _config(args)
    with folder_lock(args.out, command="lens-steer coconut run"):
        m = run(cfg, Path(args.out))
    print(report_markdown(m))
    return 0


def _train(args: argparse.Namespace) -> int:
    from lens_steer.coconut.experiment import train_saved
    from lens_steer.io import folder_lock

    out = Path(args.out)
    with folder_lock(out, command=f"lens-steer coconut train --mode {args.mode}"):
        res = train_saved(_config(args), args.mode, out, init=args.init)
    print(f"saved {out} ({res.seconds:.0f}s, {res.optimizer_steps} steps)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from lens_steer.coconut.experiment import evaluate_saved
    from lens_steer.io import write_json, write_jsonl

    m, rec = evaluate_saved(args.model, args.data, latents=args.latents, limit=args.limit)
    if args.out:
        write_json(Path(args.out) / "metrics.json", m)
        write_jsonl(Path(args.out) / "records.jsonl", rec)
    print(json.dumps(m, indent=2))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from lens_steer.coconut.experiment import inspect_saved
    from lens_steer.errors import ConfigError
    from lens_steer.io import folder_lock

    with folder_lock(args.out, command="lens-steer coconut inspect"):
        try:
            info = inspect_saved(args.model, args.data, Path(args.out), latents=args.latents,
                                 limit=args.limit)
        except ConfigError as e:
            raise SystemExit(f"coconut inspect: {e}") from e
    print(json.dumps(info.get("frontier_mass", info), indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("coconut", help="Coconut continuous thoughts vs CoT / no-CoT",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    r = sub.add_parser("run", help="train every method, evaluate, inspect, report")
    r.add_argument("--out", type=Path, required=True, help="run folder")
    add_config_arguments(r, CoconutRunConfig)
    r.set_defaults(func=_run)

    t = sub.add_parser("train", help="train one model")
    t.add_argument("--out", type=Path, required=True, help="folder of the saved model")
    t.add_argument("--mode", choices=METHODS, default="coconut", help="which method")
    t.add_argument("--init", type=Path, help="start from this saved model folder instead of a "
                   "fresh one (e.g. a CoT model, with --train.stage0-epochs 0: the paper's GSM8k "
                   "recipe)")
    add_config_arguments(t, CoconutRunConfig)

    def train_func(args: argparse.Namespace) -> int:
        if args.init and not (args.init / "config.json").exists():
            t.error(f"--init {args.init}: no saved model (config.json) there (a `coconut train` "
                    "/ `run` models/<method> folder is needed)")
        return _train(args)

    t.set_defaults(func=train_func)

    e = sub.add_parser("eval", help="score a saved model on a ProsQA-format file")
    e.add_argument("--model", required=True, help="a saved model folder")
    e.add_argument("--data", required=True, help="a ProsQA-format JSON file")
    e.add_argument("--latents", type=int, help="continuous thoughts (default: trained max)")
    e.add_argument("--limit", type=int, default=0, help="first N problems only")
    e.add_argument("--out", help="folder for metrics.json and records.jsonl")
    e.set_defaults(func=_eval)

    i = sub.add_parser("inspect", help="logit lens, frontier mass and probes on a saved model's "
                       "continuous thoughts")
    i.add_argument("--model", required=True, help="a saved Coconut model folder")
    i.add_argument("--data", required=True, help="a ProsQA-format JSON file")
    i.add_argument("--latents", type=int, help="continuous thoughts (default: trained max)")
    i.add_argument("--limit", type=int, default=200, help="first N problems (default 200)")
    i.add_argument("--out", required=True, help="folder for inspect.json, lens.jsonl, "
                   "frontier_mass.png, latent_activations.safetensors, probes/")
    i.set_defaults(func=_inspect)

    from experiments import coconut_recipe

    coconut_recipe.register(sub)
