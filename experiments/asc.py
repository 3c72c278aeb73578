"""`lens-steer asc`: extract an ASC "be concise" vector from paired traces of the extraction
split, set its strength by the KL bound (or `--asc-gamma`), and compare base vs steered
generation on the held-out split.

    lens-steer asc --model toy --out runs/asc                   # gamma from epsilon = 1e-3
    lens-steer asc --model toy --out runs/asc --epsilon 0.05
    lens-steer asc --model toy --out runs/asc --asc-gamma 8     # fixed gamma
    lens-steer asc --preset asc-r1-distill-qwen-7b --dataset toy --out runs/x  # official hook

`--read-site` / `--write-site` (hook names; default `resid_post` of `--layer`) say where v is
read and added (the official code: `blocks.L.hook_resid_pre`, `blocks.L.hook_resid_post`);
`--asc-vector raw` keeps v unnormalised so `--asc-gamma -0.27` adds -0.27·v, as the official
generate.py.

Steps (resumable stages keyed by their settings): pairs (verbose, concise) of the `--n-extract`
extraction problems give v = mean(h_L(problem + concise) - h_L(problem + verbose)) at the last
token; alpha = median ‖J v̂‖ and L = 95th percentile ‖H v̂‖ over `--n-calibration` states
(prefixes of extraction traces) give gamma; the KL of gamma·v̂ is measured on held-out states;
the `--n-eval` held-out problems are generated base and steered (gamma·v̂ on the newest position
of every step). `--gamma-grid` also evaluates fixed gammas on the shared validation split (never
on the held-out problems); with `--select` (the default) the held-out run is steered with the
grid gamma giving the shortest validation traces within `--val-margin` accuracy points of base;
the calibrated gamma is always evaluated and reported beside it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.common import AscOptions, SteerSites, StudyConfig
from experiments.config import field, register_command
from experiments.pipeline import SteeringPipeline, merge_records
from experiments.run_folder import RunFolder, fingerprint
from experiments.seal import condition_block, fmt, pct_change, plot_conditions, table, time_ratio

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend


@dataclasses.dataclass
class AscStudyConfig(SteerSites, AscOptions, StudyConfig):
    """asc"""

    asc_vector: str = field("unit", choices=("unit", "raw"))
    """"unit": gamma·v̂ (gamma in residual units); "raw": gamma·v with v = mean(concise -
    verbose) unnormalised, as the official code (its presets: gamma = -0.27 / -0.46 / -0.5)."""

    n_heldout_states: int = field(50, minimum=1)
    """States (prefixes of held-out problems' traces) on which the KL is measured."""
    trace_end: str = field("think_close", choices=("think_close", "full"))
    """Last token of each pair: before </think> or the whole completion."""
    select: bool = True
    """Steer the held-out run with the grid gamma giving the shortest validation traces within
    --val-margin accuracy points of base (false: the calibrated / --asc-gamma strength)."""
    speed_prompts: int = field(16, minimum=0)
    """Prompts of the fixed-length steered/unsteered timing (0 = skip)."""


def register(subparsers) -> None:
    register_command(subparsers, "asc", "ASC concise-reasoning steering with KL-calibrated "
                     "strength", AscStudyConfig, run_asc)


def run_asc(cfg: AscStudyConfig, out: Path, model: ModelBackend | None = None) -> Path:
    from lens_steer.steering import asc_intervention, kl_summary, measure_kl, sample_states

    t_start = time.perf_counter()
    run = RunFolder(out)
    pipe = SteeringPipeline(cfg, run, model)
    model, layer = pipe.model, pipe.layer
    pipe.asc_pairs()  # a toy dataset, before any work
    run.write_config(cfg, "asc")

    # 1. the direction from extraction pairs; 2. gamma: calibrated from epsilon, or fixed
    raw = cfg.asc_vector == "raw"
    vec = pipe.asc_direction(layer, trace_end=cfg.trace_end, raw=raw)
    read_site = pipe.read_site or f"blocks.{layer}.hook_resid_post"
    print(f"[asc] v read at {read_site}, added at {vec.site}: raw norm "
          f"{vec.provenance['raw_norm']:.2f} ({cfg.asc_vector})", flush=True)
    cal = pipe.asc_calibration(vec, measure=True)
    full = cal["full"]
    # gammas multiply the stored vector: v̂ ("unit") or v itself ("raw"); the calibration's
    # gamma is along v̂, so in the vector's units it is divided by ‖v‖
    units = vec.norm if raw else 1.0
    cal_gamma = cal["gamma"] / units
    gamma_source = "calibrated" if cfg.asc_gamma is None else "fixed"
    gamma = cal_gamma if cfg.asc_gamma is None else cfg.asc_gamma
    print(f"[asc] calibration: alpha {cal['alpha']:.3f}, L {cal['L']:.3f}, gamma "
          f"{cal['gamma']:.4f}", flush=True)
    heldout = [(p.prompt, p.verbose_trace) for p in pipe.splits.eval_toy]

    def kl(g: float) -> dict[str, Any]:
        key = {"vector": fingerprint(vec.vector), "gamma": g, "states": fingerprint(heldout),
               "n": cfg.n_heldout_states, "seed": cfg.seed, "model": cfg.identity()}
        return run.cached(f"asc-kl-g{g:g}", key, lambda: kl_summary(measure_kl(
            model, vec, g * units, sample_states(model, heldout, cfg.n_heldout_states, seed=cfg.seed)),
            cfg.epsilon))

    # 3. optional grid on the validation split
    grid: dict[str, Any] = {}
    if cfg.gamma_grid:
        vbase, summaries, picked = pipe.validation_grid(vec, cfg.gamma_grid, cfg.val_margin)
        grid["base"] = {"accuracy": vbase["accuracy"], "mean_tokens": vbase["mean_tokens"]}
        for g, s in summaries.items():
            grid[f"{g:g}"] = {"gamma": g, "accuracy": s["accuracy"],
                              "mean_tokens": s["mean_tokens"],
                              "mean_tokens_change_pct": pct_change(s["mean_tokens"],
                                                                    vbase["mean_tokens"]),
                              "accuracy_change_points": 100 * (s["accuracy"]
                                                               - vbase["accuracy"]),
                              "kl_heldout": kl(g)}
            print(f"[asc]   val gamma {g:g}: acc {s['accuracy']:.3f}, tokens "
                  f"{s['mean_tokens']:.1f}", flush=True)
        if cfg.select and cfg.asc_gamma is None and picked is not None:
            gamma = picked
            gamma_source = (f"selected on validation grid (shortest traces within "
                            f"{cfg.val_margin:g} accuracy points of base)")
    vec.scale = gamma
    vec.provenance["gamma_source"] = gamma_source
    vec.save(run.path / "asc_vector")
    kl_held, kl_cal_gamma = kl(gamma), kl(cal_gamma)

    # 4. evaluate on the held-out split
    problems = pipe.eval_problems
    conditions = {"base": [], "steered": [asc_intervention(model, vec, gamma)]}
    if gamma_source != "calibrated":
        conditions["steered_calibrated"] = [asc_intervention(model, vec, cal_gamma)]
    blocks = {}
    for name, ivs in conditions.items():
        print(f"[asc] evaluating {name} on {len(problems)} held-out problems ...", flush=True)
        summary = pipe.evaluate(name, ivs)
        blocks[name] = condition_block(summary)
        print(f"[asc]   {name}: acc {summary['accuracy']:.3f}, tokens "
              f"{summary['mean_tokens']:.1f}", flush=True)
    merge_records(run, list(conditions))
    base, steered = blocks["base"], blocks["steered"]
    changes = {name: {"mean_tokens_change_pct": pct_change(b["mean_tokens"], base["mean_tokens"]),
                      "accuracy_change_points": 100 * (b["accuracy"] - base["accuracy"])}
               for name, b in blocks.items() if name != "base"}
    ch = changes["steered"]
    targets = {"mean_tokens_drop_ge_30pct": (ch["mean_tokens_change_pct"] or 0) <= -30,
               "accuracy_within_2_points": ch["accuracy_change_points"] >= -2.0,
               "sign_shortens_traces": steered["mean_tokens"] < base["mean_tokens"]}
    speed = {}
    if cfg.speed_prompts:
        from lens_steer.eval.datasets import format_prompt

        prompts = [format_prompt(p, cfg.template) for p in problems[:cfg.speed_prompts]]
        speed = time_ratio(model, prompts, conditions["steered"])
        speed["backend"] = model.name
    metrics = {
        **blocks, "changes": changes, "targets": targets,
        "gamma": gamma, "gamma_source": gamma_source, "epsilon": cfg.epsilon,
        "calibration": {"gamma": cal["gamma"], "gamma_vector_units": cal_gamma,
                        "alpha": cal["alpha"], "L": cal["L"],
                        "x": full["x"], "epsilon": cfg.epsilon, "n_states": full["n_states"],
                        "seconds_per_state": full["seconds_per_state"],
                        "kl_heldout_states": kl_cal_gamma,
                        "jv_norms": full["jv_norms"], "hv_norms": full["hv_norms"],
                        "kl_at_calibration": full["kl_at_calibration"]},
        "kl": {"used_gamma_heldout_states": kl_held},
        "gamma_grid": grid,
        "vector": {"layer": layer, "read_site": read_site, "write_site": vec.site,
                   "scale": cfg.asc_vector, "applied": f"{gamma:g}·{'v' if raw else 'v̂'}",
                   "raw_norm": vec.provenance["raw_norm"],
                   "verbose_norm_mean": vec.provenance["verbose_norm_mean"],
                   "trace_end": cfg.trace_end},
        "n_eval": len(problems), "eval_seed": cfg.eval_seed,
        "problem_ids": [p.id for p in problems], "model_info": model.describe(),
        "speed": speed, "wall_time_s": time.perf_counter() - t_start}
    run.write_metrics(metrics)
    plot_conditions(run.path / "asc.png", blocks, f"ASC on {cfg.model} (layer {layer}, "
                                                  f"gamma {gamma:.3g}), n={len(problems)}")
    run.write_report(_report(cfg, layer, vec, gamma, gamma_source, cal, full, kl_held,
                             kl_cal_gamma, blocks, changes, targets, speed, grid))
    print(f"[asc] wrote {run.path}/metrics.json; targets {targets}")
    return run.path


def _fmt_kl(k: dict[str, Any]) -> str:
    return (f"mean {k['mean']:.2e}, median {k['median']:.2e}, p95 {k['p95']:.2e}, max "
            f"{k['max']:.2e} ({100 * k['frac_within_epsilon']:.0f}% of {k['n']} states ≤ ε)")


def _report(args: AscStudyConfig, layer, vec, gamma, gamma_source, cal, full, kl_held,
            kl_cal_gamma, blocks, changes, targets, speed, grid) -> str:
    ch = changes["steered"]
    lines = [
        f"# ASC on `{args.model}`", "",
        f"v = mean(h(problem + concise) - h(problem + verbose)) at the last token "
        f"({args.trace_end}) read at `{vec.provenance.get('read_site') or f'blocks.{layer}.hook_resid_post'}`, "
        f"{args.n_extract} extraction pairs (seed "
        f"{args.extract_seed}); ‖v‖ = {vec.provenance['raw_norm']:.2f}, applied as "
        f"gamma·{'v (raw, as the official code)' if args.asc_vector == 'raw' else 'v̂'} at "
        f"`{vec.site}` on the newest position of every step.", "",
        f"Calibration over {full['n_states']} states: alpha = median ‖J v̂‖ = {cal['alpha']:.4f}, "
        f"L = p95 ‖H v̂‖ = {cal['L']:.4f}, x = {full['x']:.4g}, calibrated gamma = {cal['gamma']:.4f} for "
        f"ε = {args.epsilon:g} ({full['seconds_per_state']:.3f} s per state).", "",
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
        lines += ["Validation grid (the shared validation split, never the held-out set):", "",
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
