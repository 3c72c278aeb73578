"""`lens-steer toy train|eval`: reproduce the shipped toy reasoner and measure it."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import TYPE_CHECKING

from experiments.common import ModelOptions
from experiments.config import ConfigBase, add_config_arguments, field, resolve_config
from lens_steer.errors import ConfigError
from lens_steer.toy.splits import EVAL_SEED
from lens_steer.toy.train import TrainConfig

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend


@dataclasses.dataclass
class ToyTrainCommand(ConfigBase, TrainConfig):
    """toy train"""

    eval_n: int = field(0, minimum=0)
    """After training, evaluate on this many held-out problems (0 = skip)."""
    recipe: str = field("shipped", choices=("single", "shipped"))
    """shipped: the three-stage recipe that reproduces the shipped model (only --out-dir is
    used); single: one run with the options above."""
    ship: bool = False
    """Copy the result (and its eval metrics) into lens_steer/toy/weights/."""


@dataclasses.dataclass
class ToyEvalCommand(ModelOptions):
    """toy eval"""

    out: str = field()
    """Folder for metrics.json and records.jsonl."""
    n: int = field(500, minimum=1)
    """Held-out problems."""
    seed: int = EVAL_SEED
    """Seed of the held-out problems."""
    max_new_tokens: int = field(256, minimum=1)
    """Generation budget per trace."""
    batch_size: int = field(64, minimum=1)
    """Sequences per generation batch."""
    traces_out: str | None = None
    """Also write the generations as a traces JSONL (prompt + generation, id, correct) that
    `lens-steer cache --traces` reads."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("toy", help="train or evaluate the toy reasoner")
    sub = parser.add_subparsers(dest="toy_command", metavar="ACTION", required=True)
    tr = sub.add_parser("train", help="train the toy reasoner from its seed (<= 20 min, 2 CPUs)")
    add_config_arguments(tr, ToyTrainCommand)
    tr.set_defaults(func=_train)
    ev = sub.add_parser("eval", help="greedy accuracy and thought mix on held-out problems")
    add_config_arguments(ev, ToyEvalCommand)
    ev.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from lens_steer.eval.toy import evaluate
    from lens_steer.io import write_json
    from lens_steer.toy.train import ship, train, train_recipe

    full = resolve_config(ToyTrainCommand, args)
    cfg = TrainConfig(**{f.name: getattr(full, f.name) for f in dataclasses.fields(TrainConfig)})
    if full.recipe == "shipped":
        changed = [f"--{k.replace('_', '-')}" for k, v in dataclasses.asdict(cfg).items()
                   if k != "out_dir" and v != getattr(TrainConfig, k, v)]
        if changed:
            raise ConfigError(f"toy train: {', '.join(changed)} only apply to a single run; "
                              "add --recipe single (the shipped recipe fixes every stage)")
    path = train_recipe(cfg.out_dir) if full.recipe == "shipped" else train(cfg)
    print(f"saved {path}")
    metrics = None
    if full.eval_n:
        metrics = evaluate(path, n=full.eval_n, out_dir=path / "eval")
        write_json(path / "eval_metrics.json", metrics)
        print(json.dumps({k: metrics[k] for k in ("accuracy", "mean_tokens",
                                                   "thoughts_per_trace")}, indent=2))
    if full.ship:
        print(f"shipped to {ship(path, metrics)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from experiments.run_folder import check_writable
    from lens_steer.eval.toy import evaluate

    cfg = resolve_config(ToyEvalCommand, args)
    check_writable(cfg.out)
    model = cfg.load()
    metrics = evaluate(model, n=cfg.n, seed=cfg.seed, out_dir=cfg.out,
                       max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                       threads=cfg.threads)
    if cfg.traces_out:
        _write_traces(model, cfg)
    print(json.dumps({k: metrics[k] for k in ("accuracy", "mean_tokens", "thoughts_per_trace",
                                               "by_correctness")}, indent=2))
    return 0


def _write_traces(model: ModelBackend, cfg: ToyEvalCommand) -> None:
    """The evaluation's generations as cache input (the same held-out problems)."""
    from pathlib import Path

    from experiments.common import traces_from_records
    from lens_steer.eval.datasets import format_prompt
    from lens_steer.eval.toy import as_problems
    from lens_steer.io import read_jsonl, write_jsonl
    from lens_steer.toy.splits import heldout_problems, training_questions

    exclude = training_questions(model.source) if Path(model.source).is_dir() else set()
    problems = as_problems(heldout_problems(cfg.n, cfg.seed, exclude), f"heldout-{cfg.seed}")
    records = read_jsonl(Path(cfg.out) / "records.jsonl")
    traces = traces_from_records(problems, [format_prompt(p, "toy") for p in problems], records)
    write_jsonl(cfg.traces_out, traces)
    print(f"[toy eval] wrote {len(traces)} traces to {cfg.traces_out}")
