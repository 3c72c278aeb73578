"""`lens-steer coconut`: continuous thoughts (Coconut) vs CoT vs no-CoT on ProsQA-style problems.

    lens-steer coconut run --out runs/coconut/x                    # official schedule, whole comparison
    lens-steer coconut run --out runs/coconut/quick --set n_train=200 --set train.epochs=3 \
        --set train.epochs_per_stage=1                              # any TrainConfig field: train.<f>
    lens-steer coconut run --set model=path/to/gpt2 --out ...      # a HF causal LM and its tokenizer
    lens-steer coconut run --config runs/coconut/x/config.json --out runs/coconut/again
    lens-steer coconut train --mode cot --out runs/coconut/cot     # one model
    lens-steer coconut train --mode coconut --init runs/coconut/cot --set train.stage0_epochs=0 \
        --out runs/coconut/from_cot                                 # latent stages on a CoT model
    lens-steer coconut eval --model runs/coconut/x/models/coconut --data prosqa_valid.json

The run folder holds config.json (resolved), data/*.json, models/<mode>/, metrics.json,
records.jsonl (one row per test problem and method), history.jsonl, lens.jsonl,
frontier_mass.png, probes/ and report.md. The comparison itself is `lens_steer.coconut.experiment`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import asdict
from pathlib import Path

from lens_steer.coconut.experiment import (
    METHODS,
    CoconutRunConfig,
    fresh_model,
    make_data,
    report_markdown,
    run,
    styled,
)
from lens_steer.coconut.train import TrainConfig


def _load_config(path: str | None, sets: list[str]) -> CoconutRunConfig:
    """A config file (JSON) plus `--set key=value` overrides (`train.<field>` for training)."""
    raw = json.loads(Path(path).read_text()) if path else {}
    raw.setdefault("train", {})
    if isinstance(raw["train"], dict):
        raw["train"] = {"val_size": 100, **raw["train"]}
    names = {f.name for f in dataclasses.fields(CoconutRunConfig)}
    tnames = {f.name for f in dataclasses.fields(TrainConfig)}
    for s in sets or []:
        key, _, val = s.partition("=")
        try:
            value = json.loads(val)
        except json.JSONDecodeError:
            value = val
        if key.startswith("train.") and key[6:] in tnames:
            raw["train"][key[6:]] = value
        elif key in names and key != "train":
            raw[key] = value
        else:
            raise SystemExit(f"--set: unknown field {key!r}; fields: {sorted(names - {'train'})}"
                             f" and train.<{'|'.join(sorted(tnames))}>")
    unknown = set(raw) - names
    if unknown:
        raise SystemExit(f"unknown config fields {sorted(unknown)}")
    return CoconutRunConfig(**raw)

def _cmd(args) -> int:
    from lens_steer.io import write_json, write_jsonl

    if args.action == "run":
        cfg = _load_config(args.config, args.set)
        m = run(cfg, Path(args.out))
        print(report_markdown(m))
        return 0
    if args.action == "train":
        from lens_steer.coconut.model import load_saved_model, save_model
        from lens_steer.coconut.train import train

        cfg = _load_config(args.config, args.set)
        out = Path(args.out)
        train_ex, val_ex, _ = (styled(cfg, x) for x in make_data(cfg))
        model, tok, ids = (load_saved_model(args.init) if args.init
                           else fresh_model(cfg, train_ex, out / "init"))
        tcfg = cfg.train_config(args.mode)
        res = train(model, tok, ids, train_ex, tcfg, val_examples=val_ex)
        save_model(model, tok, out)
        write_json(out / "run_config.json", asdict(cfg))
        write_json(out / "train_config.json", tcfg.to_dict())
        if args.init:
            write_json(out / "init.json", {"init": str(args.init)})
        write_json(out / "train_result.json", {
            "seconds": res.seconds, "optimizer_steps": res.optimizer_steps,
            "stopped_by_budget": res.stopped_by_budget, "selected_epoch": res.selected_epoch,
            "selected_val_accuracy": res.selected_val_accuracy})
        write_jsonl(out / "history.jsonl", res.history)
        print(f"saved {out} ({res.seconds:.0f}s, {res.optimizer_steps} steps)")
        return 0
    if args.action == "eval":
        from lens_steer.coconut.data import load_steps_json
        from lens_steer.coconut.evaluate import evaluate
        from lens_steer.coconut.model import load_saved_model
        from lens_steer.io import read_json

        model, tok, ids = load_saved_model(args.model)
        tc = read_json(Path(args.model) / "train_config.json")
        k = args.latents if args.latents is not None else (
            tc["max_latent_stage"] * tc["c"] if tc["mode"] == "coconut" else 0)
        rc = Path(args.model) / "run_config.json"
        style = read_json(rc)["text_style"] if rc.exists() else "prosqa"
        exs = styled(style, load_steps_json(args.data)[: args.limit or None])
        m, rec = evaluate(model, tok, ids, exs, mode=tc["mode"], n_latents=k,
                          max_new_tokens=tc.get("eval_max_new_tokens", 128))
        if args.out:
            write_json(Path(args.out) / "metrics.json", m)
            write_jsonl(Path(args.out) / "records.jsonl", rec)
        print(json.dumps(m, indent=2))
        return 0
    return 1


def register(subparsers) -> None:
    p = subparsers.add_parser("coconut", help="Coconut continuous thoughts vs CoT / no-CoT",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("run", "train", "eval"))
    p.add_argument("--out", help="run folder (run/train) or metrics folder (eval)")
    p.add_argument("--config", help="config JSON (e.g. a run folder's config.json)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field (value parsed as JSON when possible)")
    p.add_argument("--mode", choices=METHODS, default="coconut", help="train: which method")
    p.add_argument("--init", help="train: start from this saved model folder instead of a fresh "
                   "one (e.g. a CoT model, with --set train.stage0_epochs=0: the paper's GSM8k recipe)")
    p.add_argument("--model", help="eval: a saved model folder")
    p.add_argument("--data", help="eval: a ProsQA-format JSON file")
    p.add_argument("--latents", type=int, help="eval: continuous thoughts (default: trained max)")
    p.add_argument("--limit", type=int, default=0, help="eval: first N problems only")

    def func(args):
        if args.action in ("run", "train") and not args.out:
            p.error("--out is required")
        if args.init and args.action != "train":
            p.error("--init only applies to `coconut train`")
        if args.init and not (Path(args.init) / "config.json").exists():
            p.error(f"--init {args.init}: no saved model (config.json) there (a `coconut train` / `run` "
                    "models/<method> folder is needed)")
        if args.action == "eval" and not (args.model and args.data):
            p.error("eval needs --model and --data")
        return _cmd(args)

    p.set_defaults(func=func)
