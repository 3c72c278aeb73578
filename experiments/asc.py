"""`lens-steer asc`: extract an ASC "be concise" vector from paired traces of a training split,
set its strength by the KL bound (or `--gamma`), and compare base vs steered generation on
held-out problems.

    lens-steer asc --model toy --out runs/asc                   # gamma from epsilon = 1e-3
    lens-steer asc --model toy --out runs/asc --epsilon 0.05
    lens-steer asc --model toy --out runs/asc --gamma 8         # fixed gamma

Steps: pairs (verbose, concise) of `--n-train` training problems (seed `--train-seed`) give
v = mean(h_L(problem + concise) - h_L(problem + verbose)) at the last token; alpha = median
‖J v̂‖ and L = 95th percentile ‖H v̂‖ over `--n-calibration` states (prefixes of training
traces) give gamma; the KL of gamma·v̂ is measured on held-out states (prefixes of held-out
problems' traces); `--n-eval` held-out problems (seed `--eval-seed`) are generated base and
steered (gamma·v̂ on the newest position of every step). `--gamma-grid` also evaluates fixed
gammas on a validation split of the training seed (never on the held-out problems); with
`--select` (the default) the held-out run is steered with the grid gamma that gives the shortest
validation traces while keeping validation accuracy within `--val-margin` points of base (a
margin inside the 2-point target); the calibrated gamma is always evaluated and reported beside
it. `--no-select` steers with the calibrated (or `--gamma`) strength only.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from experiments.common import as_eval_problems, validation_split
from experiments.seal import (
    add_common_args,
    condition_block,
    evaluate,
    fmt,
    open_study,
    pct_change,
    plot_conditions,
    records_rows,
    table,
    time_ratio,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "asc", help="ASC concise-reasoning steering with KL-calibrated strength",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--epsilon", type=float, default=1e-3, help="KL budget for the calibration")
    p.add_argument("--gamma", type=float, default=None, help="fixed gamma (skips calibration)")
    p.add_argument("--n-calibration", type=int, default=50, help="calibration states")
    p.add_argument("--n-heldout-states", type=int, default=50, help="states for measured KL")
    p.add_argument("--trace-end", default="think_close", choices=("think_close", "full"),
                   help="last token of each pair: before </think> or the whole completion")
    p.add_argument("--gamma-grid", type=float, nargs="*", default=[20.0, 40.0, 60.0, 80.0, 100.0],
                   help="fixed gammas to evaluate on a validation split of the training seed "
                        "(pass the flag with no values to skip the grid)")
    p.add_argument("--n-val", type=int, default=200, help="validation problems for the grid")
    p.add_argument("--val-margin", type=float, default=1.0,
                   help="accuracy points below validation base that a selected gamma may lose")
    p.add_argument("--select", action=argparse.BooleanOptionalAction, default=True,
                   help="steer the held-out run with the grid gamma giving the shortest "
                        "validation traces within --val-margin accuracy points of base "
                        "(--no-select: the calibrated / --gamma strength)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lens_steer import GenerationConfig
    from lens_steer.io import write_json, write_jsonl, write_text
    from lens_steer.steering import (
        AscConfig,
        asc_intervention,
        calibrate_gamma,
        extract_asc_vector,
        kl_summary,
        measure_kl,
        sample_states,
        select_gamma,
    )

    t_start = time.perf_counter()
    model, layer, out, train, evals, config = open_study(args)
    asc_cfg = AscConfig(layer=layer, epsilon=args.epsilon, gamma=args.gamma,
                        n_calibration=args.n_calibration, n_heldout=args.n_heldout_states,
                        trace_end=args.trace_end, seed=args.train_seed)
    gen_cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    config |= {"asc": asc_cfg.to_dict(), "generation": vars(gen_cfg)}
    write_json(out / "config.json", config)

    # 1. the direction from training pairs
    pairs = [(p.prompt, p.verbose_trace, p.concise_trace) for p in train]
    data = {"toy_train_seed": args.train_seed, "n_pairs": len(pairs),
            "pairs": "ToyProblem (verbose_trace, concise_trace)"}
    vec = extract_asc_vector(model, pairs, asc_cfg, data=data)
    print(f"[asc] v at layer {layer}: raw norm {vec.provenance['raw_norm']:.2f}", flush=True)

    # 2. gamma: calibrated from epsilon (and KL measured on held-out states), or fixed
    calib_states = sample_states(model, [(p.prompt, p.verbose_trace) for p in train],
                                 args.n_calibration, seed=args.train_seed)
    heldout_states = sample_states(model, [(p.prompt, p.verbose_trace) for p in evals],
                                   args.n_heldout_states, seed=args.eval_seed)
    t0 = time.perf_counter()
    cal = calibrate_gamma(model, vec, calib_states, epsilon=args.epsilon,
                          l_quantile=asc_cfg.l_quantile)
    calib_s = time.perf_counter() - t0
    gamma_source = "calibrated" if args.gamma is None else "fixed"
    gamma = cal.gamma if args.gamma is None else args.gamma
    print(f"[asc] calibration: alpha {cal.alpha:.3f}, L {cal.L:.3f}, gamma {cal.gamma:.4f} "
          f"({cal.seconds_per_state:.3f} s/state)", flush=True)

    # 3. optional grid on a validation split of the training seed
    grid: dict[str, Any] = {}
    if args.gamma_grid:
        val = validation_split(args.model, args.n_val, args.train_seed + 1,
                               {p.question for p in train} | {p.question for p in evals})
        val_probs = as_eval_problems(val, f"val-{args.train_seed + 1}")
        _, vbase, _ = evaluate(model, val_probs, gen_cfg)
        grid["base"] = {"accuracy": vbase["accuracy"], "mean_tokens": vbase["mean_tokens"]}
        for g in args.gamma_grid:
            _, s, _ = evaluate(model, val_probs, gen_cfg, [asc_intervention(model, vec, g)])
            grid[f"{g:g}"] = {"gamma": g, "accuracy": s["accuracy"],
                              "mean_tokens": s["mean_tokens"],
                              "mean_tokens_change_pct": pct_change(s["mean_tokens"],
                                                                    vbase["mean_tokens"]),
                              "accuracy_change_points": 100 * (s["accuracy"]
                                                               - vbase["accuracy"]),
                              "kl_heldout": kl_summary(measure_kl(model, vec, g, heldout_states),
                                                       args.epsilon)}
            print(f"[asc]   val gamma {g:g}: acc {s['accuracy']:.3f}, tokens "
                  f"{s['mean_tokens']:.1f}", flush=True)
        if args.select and args.gamma is None:
            picked = select_gamma(grid["base"], {v["gamma"]: v for k, v in grid.items()
                                                 if k != "base"}, args.val_margin)
            if picked is not None:
                gamma = picked
                gamma_source = (f"selected on validation grid (shortest traces within "
                                f"{args.val_margin:g} accuracy points of base)")
    vec.scale = gamma
    vec.provenance["gamma_source"] = gamma_source
    vec.save(out / "asc_vector")
    kl_cal = kl_summary(measure_kl(model, vec, gamma, calib_states), args.epsilon)
    kl_held = kl_summary(measure_kl(model, vec, gamma, heldout_states), args.epsilon)
    kl_cal_gamma = kl_summary(measure_kl(model, vec, cal.gamma, heldout_states), args.epsilon)

    # 4. evaluate on held-out problems
    problems = as_eval_problems(evals, f"toy-{args.eval_seed}")
    conditions = {"base": [], "steered": [asc_intervention(model, vec, gamma)]}
    if gamma_source != "calibrated":
        conditions["steered_calibrated"] = [asc_intervention(model, vec, cal.gamma)]
    blocks, rows = {}, []
    for name, ivs in conditions.items():
        print(f"[asc] evaluating {name} on {len(problems)} held-out problems ...", flush=True)
        records, summary, _ = evaluate(model, problems, gen_cfg, ivs)
        blocks[name] = condition_block(summary)
        rows += records_rows(name, records)
        print(f"[asc]   {name}: acc {summary['accuracy']:.3f}, tokens "
              f"{summary['mean_tokens']:.1f}", flush=True)
    base, steered = blocks["base"], blocks["steered"]
    changes = {name: {"mean_tokens_change_pct": pct_change(b["mean_tokens"], base["mean_tokens"]),
                      "accuracy_change_points": 100 * (b["accuracy"] - base["accuracy"])}
               for name, b in blocks.items() if name != "base"}
    ch = changes["steered"]
    targets = {"mean_tokens_drop_ge_30pct": (ch["mean_tokens_change_pct"] or 0) <= -30,
               "accuracy_within_2_points": ch["accuracy_change_points"] >= -2.0,
               "sign_shortens_traces": steered["mean_tokens"] < base["mean_tokens"]}
    speed = {}
    if args.speed_prompts:
        prompts = [p.meta["prompt"] for p in problems[:args.speed_prompts]]
        speed = time_ratio(model, prompts, conditions["steered"])
        speed["backend"] = model.name
    cal_block = {k: v for k, v in cal.to_dict().items()}
    metrics = {
        **blocks, "changes": changes, "targets": targets,
        "gamma": gamma, "gamma_source": gamma_source, "epsilon": args.epsilon,
        "calibration": {"gamma": cal.gamma, "alpha": cal.alpha, "L": cal.L, "x": cal.x,
                        "epsilon": args.epsilon, "n_states": cal.n_states,
                        "seconds_per_state": cal.seconds_per_state,
                        "total_seconds": calib_s,
                        "kl_heldout_states": kl_cal_gamma,
                        "jv_norms": cal_block["jv_norms"], "hv_norms": cal_block["hv_norms"],
                        "kl_at_calibration": cal_block["kl_at_calibration"]},
        "kl": {"used_gamma_calibration_states": kl_cal, "used_gamma_heldout_states": kl_held},
        "gamma_grid": grid,
        "vector": {"layer": layer, "raw_norm": vec.provenance["raw_norm"],
                   "verbose_norm_mean": vec.provenance["verbose_norm_mean"],
                   "trace_end": args.trace_end},
        "training_data": data, "n_eval": len(problems), "eval_seed": args.eval_seed,
        "speed": speed, "wall_time_s": time.perf_counter() - t_start}
    write_json(out / "metrics.json", metrics)
    write_jsonl(out / "records.jsonl", rows)
    plot_conditions(out / "asc.png", blocks, f"ASC on {args.model} (layer {layer}, "
                                             f"gamma {gamma:.3g}), n={len(problems)}")
    write_text(out / "report.md", _report(args, layer, vec, gamma, gamma_source, cal, kl_held,
                                          kl_cal_gamma, blocks, changes, targets, speed, grid))
    print(f"[asc] wrote {out}/metrics.json; targets {targets}")
    return 0


def _fmt_kl(k: dict[str, Any]) -> str:
    return (f"mean {k['mean']:.2e}, median {k['median']:.2e}, p95 {k['p95']:.2e}, max "
            f"{k['max']:.2e} ({100 * k['frac_within_epsilon']:.0f}% of {k['n']} states ≤ ε)")


def _report(args, layer, vec, gamma, gamma_source, cal, kl_held, kl_cal_gamma, blocks, changes,
            targets, speed, grid) -> str:
    ch = changes["steered"]
    lines = [
        f"# ASC on `{args.model}`", "",
        f"v = mean(h(problem + concise) - h(problem + verbose)) at the last token "
        f"({args.trace_end}), layer {layer}, {args.n_train} training pairs (seed "
        f"{args.train_seed}); ‖v‖ = {vec.provenance['raw_norm']:.2f}, applied as gamma·v̂ on the "
        "newest position of every step.", "",
        f"Calibration over {cal.n_states} states: alpha = median ‖J v̂‖ = {cal.alpha:.4f}, "
        f"L = p95 ‖H v̂‖ = {cal.L:.4f}, x = {cal.x:.4g}, calibrated gamma = {cal.gamma:.4f} for "
        f"ε = {args.epsilon:g} ({cal.seconds_per_state:.3f} s per state).", "",
        f"KL of the calibrated gamma on held-out states: {_fmt_kl(kl_cal_gamma)}.", "",
        f"Gamma used for `steered`: {gamma:.4g} ({gamma_source}); its KL on held-out states: "
        f"{_fmt_kl(kl_held)}.", "",
        f"Held-out: {args.n_eval} problems, seed {args.eval_seed}; greedy, max "
        f"{args.max_new_tokens} new tokens, backend {args.backend}.", "", table(blocks), "",
        f"Steered vs base: mean tokens {fmt(ch['mean_tokens_change_pct'])}%, accuracy "
        f"{fmt(ch['accuracy_change_points'])} points.", "",
        "Targets: " + ", ".join(f"{k}: {'PASS' if v else 'MISS'}" for k, v in targets.items()),
        ""]
    if grid:
        lines += ["Validation grid (training seed + 1, not the held-out set):", "",
                  "| gamma | accuracy | mean tokens | Δ tokens | median KL |", "|---|---|---|---|---|",
                  f"| 0 | {100 * grid['base']['accuracy']:.1f}% | "
                  f"{grid['base']['mean_tokens']:.1f} | | |"]
        for k, v in grid.items():
            if k != "base":
                lines.append(f"| {v['gamma']:g} | {100 * v['accuracy']:.1f}% | "
                             f"{v['mean_tokens']:.1f} | {fmt(v['mean_tokens_change_pct'])}% | "
                             f"{v['kl_heldout']['median']:.2e} |")
        lines.append("")
    if speed:
        lines += [f"Speed ({speed['backend']}, {speed['n_prompts']} prompts x "
                  f"{speed['new_tokens']} tokens, fixed length): steered / unsteered = "
                  f"{speed['ratio']:.3f}.", ""]
    lines += ["![ASC](asc.png)", ""]
    return "\n".join(lines)
