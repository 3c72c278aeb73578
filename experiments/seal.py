"""`lens-steer seal`: extract a SEAL vector on a training split, then compare base, SEAL-steered
and logits-penalty generation on held-out problems.

    lens-steer seal --model toy --out runs/seal
    lens-steer seal --model toy --out runs/seal --layer 4 --alpha 1.0 --ablation

Steps: generate the model's own greedy traces on `--n-train` training problems (seed
`--train-seed`; or read `--traces FILE`, JSONL with `text` and optional `correct`), cache
`resid_post` at thought delimiters at the layer, S = mean(execution) - mean(reflection ∪
transition), then evaluate `--n-eval` held-out problems (seed `--eval-seed`, training questions
excluded) base / steered (alpha·S at delimiters inside <think>) / penalty (-3 on trigger-word
logits). The run folder gets config.json, metrics.json, records.jsonl, seal_vector.*, a PNG and
report.md. The shared helpers here are also used by `lens-steer asc`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.common import as_eval_problems, default_layer, toy_splits

TYPES = ("execution", "reflection", "transition")


# -- shared helpers (also used by experiments.asc) -----------------------------------------------
def add_common_args(p: argparse.ArgumentParser) -> None:
    from lens_steer.toy.splits import EVAL_SEED

    p.add_argument("--config", type=Path, default=None,
                   help="JSON/TOML whose keys are these options (a run's config.json): defaults "
                        "for this run; flags given here win")
    p.set_defaults(_config_parser=p)
    p.add_argument("--model", default="toy", help="'toy', a local HF model dir, or a hub id")
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--backend", default="transformer_lens", choices=("transformer_lens", "nnsight"))
    p.add_argument("--device", default=None)
    p.add_argument("--layer", type=int, default=None,
                   help="steered layer (default: about 2/3 of the depth)")
    p.add_argument("--n-train", type=int, default=300, help="training-split problems")
    p.add_argument("--n-eval", type=int, default=200, help="held-out evaluation problems")
    p.add_argument("--train-seed", type=int, default=101, help="seed of the training split")
    p.add_argument("--eval-seed", type=int, default=EVAL_SEED, help="seed of the held-out split")
    p.add_argument("--max-new-tokens", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--speed-prompts", type=int, default=16,
                   help="prompts of the fixed-length steered/unsteered timing (0 = skip)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: small models on a shared CPU slow down a lot "
                        "with more; 0 = torch's default)")


class _Recorder:
    """Backend proxy that keeps the last GenerationResult (run_eval returns records only)."""

    def __init__(self, model: Any) -> None:
        self._model, self.result = model, None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self.result = self._model.generate(*args, **kwargs)
        return self.result


def evaluate(model: Any, problems: Sequence[Any], config: Any, interventions: Sequence[Any] = (),
             ) -> tuple[list[Any], dict[str, Any], Any]:
    """run_eval on toy problems; returns (records, summary, GenerationResult)."""
    from lens_steer.eval import run_eval

    rec = _Recorder(model)
    records, summary = run_eval(rec, problems, "toy", template="toy", config=config,
                                interventions=list(interventions))
    summary["n_steered_sites"] = len(rec.result.steered)
    summary["steered_sites_per_trace"] = len(rec.result.steered) / max(1, len(problems))
    return records, summary, rec.result


def time_ratio(model: Any, prompts: Sequence[str], interventions: Sequence[Any],
               new_tokens: int = 64, repeats: int = 3, batch_size: int = 16) -> dict[str, Any]:
    """Steered / unsteered wall time of fixed-length greedy generation on the same prompts
    (EOS ignored so both write the same number of tokens), median of interleaved repeats."""
    from lens_steer import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False, batch_size=batch_size)
    times: dict[str, list[float]] = {"unsteered": [], "steered": []}
    model.generate(list(prompts), cfg)  # warm-up
    for _ in range(repeats):
        for name, ivs in (("unsteered", ()), ("steered", interventions)):
            t0 = time.perf_counter()
            out = model.generate(list(prompts), cfg, list(ivs))
            times[name].append(time.perf_counter() - t0)
            if name == "steered":
                sites = len(out.steered)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"unsteered_s": med["unsteered"], "steered_s": med["steered"],
            "ratio": med["steered"] / med["unsteered"], "n_prompts": len(prompts),
            "new_tokens": new_tokens, "repeats": repeats, "steered_sites": sites}


def fmt(x: float | None, spec: str = "+.1f") -> str:
    return "n/a" if x is None else format(x, spec)


def pct_change(new: float | None, old: float | None) -> float | None:
    if new is None or not old:
        return None
    return 100.0 * (new - old) / old


def refl_trans(summary: dict[str, Any]) -> float:
    t = summary["thoughts_per_trace"]
    return (t.get("reflection") or 0.0) + (t.get("transition") or 0.0)


def condition_block(summary: dict[str, Any]) -> dict[str, Any]:
    """The metrics.json block of one condition (the summary, with the headline keys first)."""
    return {"accuracy": summary["accuracy"], "mean_tokens": summary["mean_tokens"],
            "thoughts_per_trace": summary["thoughts_per_trace"],
            "reflection_transition_per_trace": refl_trans(summary),
            **{k: v for k, v in summary.items()
               if k not in ("accuracy", "mean_tokens", "thoughts_per_trace")}}


def records_rows(condition: str, records: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"condition": condition, **r.to_dict()} for r in records]


def plot_conditions(path: Path, blocks: dict[str, dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(blocks)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        vals = [blocks[name]["thoughts_per_trace"].get(t) or 0 for t in TYPES]
        ax1.bar([i + k * width for i in range(len(TYPES))], vals, width, label=name)
    ax1.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(TYPES))], TYPES)
    ax1.set_ylabel("thoughts per trace")
    ax1.legend()
    ax2.bar(names, [blocks[n]["mean_tokens"] for n in names],
            color=[f"C{i}" for i in range(len(names))])
    for i, n in enumerate(names):
        ax2.text(i, blocks[n]["mean_tokens"], f"acc {100 * blocks[n]['accuracy']:.1f}%",
                 ha="center", va="bottom", fontsize=8)
    ax2.set_ylabel("mean generated tokens")
    ax2.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(blocks: dict[str, dict[str, Any]]) -> str:
    lines = ["| condition | accuracy | mean tokens | execution | reflection | transition | "
             "refl+trans |", "|---|---|---|---|---|---|---|"]
    for name, b in blocks.items():
        t = b["thoughts_per_trace"]
        lines.append(f"| {name} | {100 * b['accuracy']:.1f}% | {b['mean_tokens']:.1f} | "
                     f"{t.get('execution') or 0:.2f} | {t.get('reflection') or 0:.2f} | "
                     f"{t.get('transition') or 0:.2f} | {refl_trans(b):.2f} |")
    return "\n".join(lines)


def set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


# -- the command ----------------------------------------------------------------------------------
def open_study(args: argparse.Namespace) -> tuple[Any, int, Path, list, list, dict[str, Any]]:
    """Shared start of `seal` / `asc`: threads, run folder, model, layer, toy splits, config."""
    from lens_steer import load_model

    set_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model, backend=args.backend, device=args.device)
    layer = default_layer(model.n_layers) if args.layer is None else args.layer
    train, evals = toy_splits(args.model, args.n_train, args.n_eval, args.train_seed,
                              args.eval_seed)
    config = {"command": args.command,
              **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                 if k not in ("func", "_config_parser")},
              "layer": layer, "model_info": model.describe()}
    return model, layer, args.out, train, evals, config


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "seal", help="SEAL steering vs base vs logits penalty on held-out problems",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--alpha", type=float, default=1.0, help="steering strength (default 1)")
    p.add_argument("--variant", default="both", choices=("both", "reflection", "transition"),
                   help="labels S steers away from")
    p.add_argument("--ablation", action="store_true",
                   help="also evaluate the other two variants")
    p.add_argument("--traces", default=None,
                   help="JSONL training traces (text incl. prompt, optional correct) instead of "
                        "generating them")
    p.add_argument("--trace-source", default="model", choices=("model", "reference"),
                   help="training traces: the model's own greedy traces, or the toy problems' "
                        "reference verbose traces")
    p.add_argument("--penalty", type=float, default=-3.0, help="logit bias of trigger tokens")
    p.add_argument("--triggers", nargs="+", default=["wait", "alternatively"],
                   help="trigger words of the logits-penalty baseline")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lens_steer import GenerationConfig
    from lens_steer.cache import CacheConfig, cache_thoughts, load_cache
    from lens_steer.eval import answer_checker, extract_prediction
    from lens_steer.io import read_jsonl, write_json, write_jsonl, write_text
    from lens_steer.steering import (
        PenaltyConfig,
        SealConfig,
        extract_seal_vector,
        seal_intervention,
        trigger_logit_bias,
    )

    t_start = time.perf_counter()
    model, layer, out, train, evals, config = open_study(args)
    seal_cfg = SealConfig(layer=layer, variant=args.variant, alpha=args.alpha)
    penalty_cfg = PenaltyConfig(triggers=tuple(args.triggers), penalty=args.penalty)
    gen_cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    config |= {"seal": seal_cfg.to_dict(), "penalty": penalty_cfg.to_dict(),
               "generation": vars(gen_cfg)}
    write_json(out / "config.json", config)

    # 1. training traces: the model's own greedy traces on the training split
    if args.traces:
        traces = read_jsonl(args.traces)
        data = {"traces_file": str(args.traces), "n": len(traces)}
    elif args.trace_source == "reference":
        traces = [{"id": f"train-{i}", "text": p.prompt + p.verbose_trace,
                   "correct": p.verbose_correct} for i, p in enumerate(train)]
        data = {"toy_train_seed": args.train_seed, "n_traces": len(traces),
                "n_correct": sum(t["correct"] for t in traces),
                "source": "reference verbose traces"}
    else:
        print(f"[seal] generating {len(train)} training traces (seed {args.train_seed}) ...",
              flush=True)
        res = model.generate([p.prompt for p in train], gen_cfg)
        check = answer_checker("toy")
        traces = [{"id": f"train-{i}", "text": p.prompt + text,
                   "correct": bool(check(extract_prediction(text), str(p.answer)))}
                  for i, (p, text) in enumerate(zip(train, res.texts, strict=True))]
        write_jsonl(out / "train_traces.jsonl", traces)
        data = {"toy_train_seed": args.train_seed, "n_traces": len(traces),
                "n_correct": sum(t["correct"] for t in traces), "source": "model greedy traces"}
    # 2. cache and extract
    cache_thoughts(model, traces, out / "cache", CacheConfig(layers=[layer], progress=False),
                   overwrite=True)
    cache = load_cache(out / "cache")
    vec = extract_seal_vector(cache, config=seal_cfg, data=data, model=model)
    vec.save(out / "seal_vector")
    print(f"[seal] S at layer {layer}: norm {vec.norm:.2f}, thoughts "
          f"{vec.provenance['thought_counts']}", flush=True)

    # 3. evaluate on held-out problems
    problems = as_eval_problems(evals, f"toy-{args.eval_seed}")
    conditions: dict[str, tuple[Any, list]] = {
        "base": (gen_cfg, []),
        "steered": (gen_cfg, [seal_intervention(model, vec, args.alpha)]),
        "penalty": (GenerationConfig(**{**vars(gen_cfg),
                                        "logit_bias": trigger_logit_bias(model.tokenizer,
                                                                         penalty_cfg)}), []),
    }
    if args.ablation:
        for variant in ("both", "reflection", "transition"):
            if variant == args.variant:
                continue
            v2 = extract_seal_vector(cache, config=SealConfig(layer=layer, variant=variant,
                                                              alpha=args.alpha), data=data,
                                     model=model)
            v2.save(out / f"seal_vector_{variant}")
            conditions[f"steered_{variant}"] = (gen_cfg, [seal_intervention(model, v2)])
    blocks, rows = {}, []
    for name, (cfg, ivs) in conditions.items():
        print(f"[seal] evaluating {name} on {len(problems)} held-out problems ...", flush=True)
        records, summary, _ = evaluate(model, problems, cfg, ivs)
        blocks[name] = condition_block(summary)
        rows += records_rows(name, records)
        print(f"[seal]   {name}: acc {summary['accuracy']:.3f}, tokens "
              f"{summary['mean_tokens']:.1f}, refl+trans/trace {refl_trans(summary):.2f}",
              flush=True)
    base, steered = blocks["base"], blocks["steered"]
    changes = {
        name: {"reflection_transition_change_pct": pct_change(refl_trans(b), refl_trans(base)),
               "mean_tokens_change_pct": pct_change(b["mean_tokens"], base["mean_tokens"]),
               "accuracy_change_points": 100 * (b["accuracy"] - base["accuracy"])}
        for name, b in blocks.items() if name != "base"}
    ch = changes["steered"]
    targets = {
        "reflection_transition_drop_ge_30pct": (ch["reflection_transition_change_pct"] or 0)
        <= -30,
        "mean_tokens_drop": steered["mean_tokens"] < base["mean_tokens"],
        "accuracy_within_2_points": ch["accuracy_change_points"] >= -2.0,
    }
    speed = {}
    if args.speed_prompts:
        prompts = [p.meta["prompt"] for p in problems[:args.speed_prompts]]
        speed = time_ratio(model, prompts, conditions["steered"][1])
        speed["backend"] = model.name
    metrics = {**{k: v for k, v in blocks.items()}, "changes": changes, "targets": targets,
               "vector": {"layer": layer, "norm": vec.norm, "alpha": args.alpha,
                          "variant": args.variant,
                          "thought_counts": vec.provenance["thought_counts"]},
               "training_data": data, "n_eval": len(problems), "eval_seed": args.eval_seed,
               "speed": speed, "wall_time_s": time.perf_counter() - t_start}
    write_json(out / "metrics.json", metrics)
    write_jsonl(out / "records.jsonl", rows)
    plot_conditions(out / "seal.png", blocks, f"SEAL on {args.model} (layer {layer}, "
                                               f"alpha {args.alpha}), n={len(problems)}")
    write_text(out / "report.md", _report(args, layer, vec, blocks, changes, targets, speed,
                                          data))
    print(f"[seal] wrote {out}/metrics.json; targets {targets}")
    return 0


def _report(args, layer, vec, blocks, changes, targets, speed, data) -> str:
    ch = changes["steered"]
    lines = [
        f"# SEAL on `{args.model}`", "",
        f"S = mean(execution) - mean({'reflection ∪ transition' if args.variant == 'both' else args.variant})"
        f" of resid_post at layer {layer} at thought delimiters, from {data}. "
        f"‖S‖ = {vec.norm:.2f}; thoughts used: {vec.provenance['thought_counts']}. "
        f"Applied as {args.alpha}·S on delimiter steps inside `<think>`. Penalty baseline: "
        f"{args.penalty} on tokens of {args.triggers}.", "",
        f"Held-out: {args.n_eval} problems, seed {args.eval_seed} (training split seed "
        f"{args.train_seed}); greedy, max {args.max_new_tokens} new tokens, backend "
        f"{args.backend}.", "", table(blocks), "",
        f"Steered vs base: reflection+transition per trace "
        f"{fmt(ch['reflection_transition_change_pct'])}%, mean tokens "
        f"{fmt(ch['mean_tokens_change_pct'])}%, accuracy {fmt(ch['accuracy_change_points'])} "
        "points.", "",
        "Targets: " + ", ".join(f"{k}: {'PASS' if v else 'MISS'}" for k, v in targets.items()),
        ""]
    if speed:
        lines += [f"Speed ({speed['backend']}, {speed['n_prompts']} prompts x "
                  f"{speed['new_tokens']} tokens, fixed length): steered / unsteered = "
                  f"{speed['ratio']:.3f} ({speed['steered_s']:.2f} s vs "
                  f"{speed['unsteered_s']:.2f} s).", ""]
    lines += ["![SEAL](seal.png)", ""]
    return "\n".join(lines)
