"""`lens-steer coconut recipe`: a multi-seed Coconut vs CoT vs no-CoT study, resumable.

    lens-steer coconut recipe a2 --seeds 0 1 2 --out runs/coconut/a2
    lens-steer coconut recipe a2 --seeds 0 --out runs/coconut/a2 &    # one process per core
    lens-steer coconut recipe a2 --seeds 1 --out runs/coconut/a2

A recipe is a folder of `experiments/coconut_recipes/` holding three `CoconutRunConfig` files
(and optionally `cot_pre.json`). Per seed (`<out>/s<seed>/`):

1. `cot/`: CoT (`cot.json`), from scratch or from `cot_pre/` (CoT trained first on easier data by
   `cot_pre.json`); the "model pretrained on the generator's language".
2. `coconut/` and `nocot/`: Coconut's latent stages and the no-CoT baseline, each started from
   that CoT model with the same number of extra steps (`coconut.json`, `nocot.json`).
3. `eval/`: every model on the seed's generated validation (300) and test (500) problems and on
   the real ProsQA validation split (`--real`). Coconut is scored with its trained thought count
   and, on validation, with every smaller k; `choice.json` picks the k to report **on generated
   validation only** (best accuracy among the k whose generated tokens stay below CoT's).
4. `inspect-real/`: logit lens, frontier mass and probes on the real split's thoughts.

`<out>/summary.md` and `summary.json`: each number per seed and as mean ± sample std over the
finished seeds, with the issue-20 goal (Coconut >= no-CoT + 10 points on the real split, fewer
generated tokens than CoT) checked. A step whose output exists is skipped; an output made with
other settings is an error (runs never mix configurations).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path

from lens_steer.errors import ConfigError, DataError

RECIPES = Path(__file__).resolve().parent / "coconut_recipes"
DEFAULT_REAL = Path("../shared/data/prosqa/prosqa_valid.json")
N_VAL, N_TEST, N_INSPECT = 300, 500, 200


def recipe_configs(name: str) -> dict:
    """{mode: CoconutRunConfig dict} of recipe `name`."""
    folder = RECIPES / name
    if not folder.is_dir():
        known = sorted(p.name for p in RECIPES.iterdir() if p.is_dir())
        raise ConfigError(f"no Coconut recipe {name!r}; known: {', '.join(known)} "
                          f"(a recipe is a folder of {RECIPES} with cot/coconut/nocot.json)")
    files = {m: folder / f"{m}.json" for m in ("cot_pre", "cot", "coconut", "nocot")}
    return {m: json.loads(f.read_text()) for m, f in files.items()
            if m != "cot_pre" or f.exists()}


def _same(a, b) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def _train_step(cfg, mode: str, out: Path, init: Path | None) -> None:
    from lens_steer.coconut.experiment import train_saved
    from lens_steer.io import read_json

    if (out / "train_result.json").exists():
        if not _same(read_json(out / "run_config.json"), asdict(cfg)):
            raise ConfigError(f"{out} holds a {mode} model trained with other settings than "
                              "this recipe's; pass a new --out (runs never mix configurations)")
        return
    train_saved(cfg, mode, out, init=init)


def _eval_step(model: Path, data: Path, out: Path, latents: int | None = None) -> dict:
    from lens_steer.coconut.experiment import evaluate_saved
    from lens_steer.io import read_json, write_json, write_jsonl

    spec = {"model": str(model), "data": str(data), "latents": latents}
    if (out / "metrics.json").exists():
        if not _same(read_json(out / "spec.json"), spec):
            raise ConfigError(f"{out} holds an evaluation of something else "
                              f"({read_json(out / 'spec.json')}); pass a new --out")
        return read_json(out / "metrics.json")
    m, rec = evaluate_saved(model, data, latents=latents)
    write_jsonl(out / "records.jsonl", rec)
    write_json(out / "spec.json", spec)
    write_json(out / "metrics.json", m)
    return read_json(out / "metrics.json")          # the same types as a resumed run's


def choose_k(val: dict[int, dict], cot_tokens: float) -> dict:
    """The thought count to report, from generated-validation metrics only: the best accuracy
    among the k whose mean generated tokens are below CoT's (ties: fewer tokens); when no k is
    below CoT's, the best among all, flagged `below_cot_tokens: false`."""
    ok = {k: m for k, m in val.items() if m["mean_generated_tokens"] < cot_tokens}
    pool = ok or val
    k = max(pool, key=lambda k: (pool[k]["accuracy"], -pool[k]["mean_generated_tokens"]))
    return {"k": k, "below_cot_tokens": bool(ok),
            "rule": "argmax validation accuracy over k with generated tokens < CoT's",
            "cot_val_tokens": cot_tokens,
            "val": {k: {"accuracy": m["accuracy"], "tokens": m["mean_generated_tokens"]}
                    for k, m in sorted(val.items())}}


def run_seed(name: str, seed: int, out: Path, real: Path, *, inspect: bool = True) -> dict:
    """Every step of recipe `name` for one seed (skipping finished ones); returns its row."""
    import torch

    from lens_steer.coconut.data import save_prosqa
    from lens_steer.coconut.experiment import CoconutRunConfig, inspect_saved, make_data
    from lens_steer.io import folder_lock, read_json, write_json

    cfgs = {m: CoconutRunConfig(**{**c, "seed": seed}) for m, c in recipe_configs(name).items()}
    sd = out / f"s{seed}"
    with folder_lock(sd, command=f"lens-steer coconut recipe {name} --seeds {seed}"):
        if cfgs["cot"].train.num_threads:
            torch.set_num_threads(cfgs["cot"].train.num_threads)
        data = {"val": out / "data" / f"s{seed}_val{N_VAL}.json",
                "test": out / "data" / f"s{seed}_test{N_TEST}.json", "real": real}
        if not (data["val"].exists() and data["test"].exists()):
            gen = CoconutRunConfig(**{**asdict(cfgs["cot"]), "n_train": 1, "n_val": N_VAL,
                                      "n_test": N_TEST})
            _, val, test = make_data(gen)
            save_prosqa(data["val"], val)
            save_prosqa(data["test"], test)
        if "cot_pre" in cfgs:                          # optional: CoT on easier data first
            _train_step(cfgs["cot_pre"], "cot", sd / "cot_pre", None)
        _train_step(cfgs["cot"], "cot", sd / "cot", sd / "cot_pre" if "cot_pre" in cfgs else None)
        for mode in ("coconut", "nocot"):
            _train_step(cfgs[mode], mode, sd / mode, sd / "cot")
        res: dict = {"seed": seed}
        for mode in ("cot", "nocot", "coconut"):
            res[mode] = {split: _eval_step(sd / mode, path, sd / "eval" / f"{mode}-{split}")
                         for split, path in data.items()}
            res[mode]["train"] = read_json(sd / mode / "train_result.json")
        kmax = cfgs["coconut"].train_config("coconut").eval_latents
        val = {kmax: res["coconut"]["val"]}
        for k in range(kmax):
            val[k] = _eval_step(sd / "coconut", data["val"], sd / "eval" / f"coconut-val-k{k}", k)
        choice = choose_k(val, res["cot"]["val"]["mean_generated_tokens"])
        write_json(sd / "choice.json", choice)
        k = choice["k"]
        res["coconut_chosen"] = {"k": k, **{
            split: (res["coconut"][split] if k == kmax else
                    _eval_step(sd / "coconut", path, sd / "eval" / f"coconut-{split}-k{k}", k))
            for split, path in data.items()}}
        if inspect and not (sd / "inspect-real" / "inspect.json").exists():
            inspect_saved(sd / "coconut", real, sd / "inspect-real", limit=N_INSPECT)
        write_json(sd / "result.json", res)
    return res


ROWS = [("CoT", "cot"), ("no-CoT", "nocot"), ("Coconut, all thoughts", "coconut"),
        ("Coconut, k chosen on val", "coconut_chosen")]


def _ms(xs: list[float], pct: bool = True) -> str:
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.1f}")
    if len(xs) == 1:
        return f(xs[0])
    return f"{f(statistics.mean(xs))} ± {f(statistics.stdev(xs))}"


def summarize(out: Path) -> dict:
    """Mean ± sample std over every finished seed of `out`; writes summary.json / summary.md."""
    from lens_steer.io import read_json, write_json, write_text

    rows = [read_json(p) for p in sorted(out.glob("s*/result.json"))]
    if not rows:
        raise DataError(f"{out} has no finished seed (s*/result.json)")
    seeds = [r["seed"] for r in rows]
    table = {}
    for label, key in ROWS:
        col = [r[key] for r in rows]
        table[label] = {
            **{f"{split}_accuracy": [c[split]["accuracy"] for c in col]
               for split in ("val", "test", "real")},
            "real_generated_tokens": [c["real"]["mean_generated_tokens"] for c in col],
            "real_tokens_incl_latents": [c["real"]["mean_tokens_incl_latents"] for c in col],
            "real_option_rate": [c["real"].get("option_rate") for c in col],
            **({"k": [c["k"] for c in col]} if key == "coconut_chosen" else {}),
        }
    co, no, cot = (table[x] for x in ("Coconut, k chosen on val", "no-CoT", "CoT"))
    gap = statistics.mean(co["real_accuracy"]) - statistics.mean(no["real_accuracy"])
    fewer = statistics.mean(co["real_generated_tokens"]) < statistics.mean(
        cot["real_generated_tokens"])
    goal = {"coconut_minus_nocot_real_points": 100 * gap, "fewer_tokens_than_cot": fewer,
            "n_seeds": len(rows),
            "met": bool(gap >= 0.10 and fewer and len(rows) >= 3)}
    summary = {"seeds": seeds, "table": table, "goal": goal}
    lines = [f"# Coconut recipe summary ({out}); seeds {seeds}", "",
             "Accuracy in % (mean ± sample std over seeds); generated-validation (300), "
             "generated-test (500) and real ProsQA validation (300) problems.", "",
             "| method | val | test | real | real: generated tokens | incl. latents | "
             "real: answers an option |", "|---|---|---|---|---|---|---|"]
    for label, t in table.items():
        opt = [x for x in t["real_option_rate"] if x is not None]
        lines.append(f"| {label}{' (k = ' + ', '.join(map(str, t['k'])) + ')' if 'k' in t else ''}"
                     f" | {_ms(t['val_accuracy'])} | {_ms(t['test_accuracy'])} | "
                     f"{_ms(t['real_accuracy'])} | {_ms(t['real_generated_tokens'], False)} | "
                     f"{_ms(t['real_tokens_incl_latents'], False)} | "
                     f"{_ms(opt) if opt else '-'} |")
    lines += ["", f"Goal (Coconut >= no-CoT + 10 points on the real split, fewer generated tokens "
                  f"than CoT, >= 3 seeds): Coconut − no-CoT = {goal['coconut_minus_nocot_real_points']:+.1f}"
                  f" points, fewer tokens: {fewer}, seeds: {len(rows)} -> "
                  f"{'met' if goal['met'] else 'NOT met'}.", ""]
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", "\n".join(lines))
    return summary


def _recipe(args: argparse.Namespace) -> int:
    recipe_configs(args.recipe)                        # a bad name fails before any work
    if not args.summary_only:
        if not args.real.exists():
            raise FileNotFoundError(f"real ProsQA validation split not found at {args.real}: "
                                    "pass --real path/to/prosqa_valid.json")
        for seed in args.seeds:
            run_seed(args.recipe, seed, args.out, args.real, inspect=not args.no_inspect)
    summarize(args.out)
    print((args.out / "summary.md").read_text())
    return 0


def register(sub) -> None:
    """Add `recipe` to the `lens-steer coconut` actions."""
    p = sub.add_parser("recipe", help="a multi-seed study from a shipped recipe (resumable)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe name (a folder of experiments/coconut_recipes/)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, required=True, help="study folder (one s<seed>/ per seed)")
    p.add_argument("--real", type=Path, default=DEFAULT_REAL,
                   help=f"the real ProsQA validation split (default {DEFAULT_REAL})")
    p.add_argument("--no-inspect", action="store_true", help="skip the logit lens and probes")
    p.add_argument("--summary-only", action="store_true",
                   help="only rebuild summary.md / summary.json from finished seeds")
    p.set_defaults(func=_recipe)
