"""`lens-steer demo` (= `make demo`): the whole method, end to end, on the shipped toy reasoner.

generate traces → thought statistics (correct vs incorrect) → per-layer probes with the layer
curve → SEAL vector at the best probe layer → base vs SEAL vs logits penalty → ASC (vector,
gamma calibration, base vs ASC) → `runs/demo/report.md` with plots inline and
`runs/demo/metrics.json` (sections `thoughts`, `probes`, `seal`, `asc`). Resumable: a second
run re-uses finished stages.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.common import SteeringStudyConfig, check_layers
from experiments.config import field, register_command
from experiments.pipeline import SteeringPipeline, cache_key, changes, merge_records
from experiments.run_folder import RunFolder, markdown_table
from lens_steer.thoughts import LABELS

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend


@dataclasses.dataclass
class DemoConfig(SteeringStudyConfig):
    """demo"""

    probe_folds: int = field(5, minimum=2)
    """Cross-validation folds of the probes (grouped by trace)."""
    penalty: float = -3.0
    """Logits-penalty baseline: added to reflection/transition trigger-token logits."""
    asc_layer: int | None = field(None, minimum=0)
    """ASC layer; None = the same default as the sweeps (about 2/3 of the depth)."""


def register(sub: argparse._SubParsersAction) -> None:
    register_command(sub, "demo", "the main job on the shipped toy reasoner (make demo)",
                     DemoConfig, run_demo)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(cfg: DemoConfig, out: Path, model: ModelBackend | None = None) -> Path:
    from lens_steer.steering.baselines import PenaltyConfig, trigger_logit_bias
    from probes import probe_layers

    t0 = time.perf_counter()
    run = RunFolder(out)
    _say(f"loading {cfg.model} ({cfg.backend}) and building the splits")
    pipe = SteeringPipeline(dataclasses.replace(cfg, method="seal"), run, model)
    model = pipe.model
    asc_layer = cfg.asc_layer if cfg.asc_layer is not None else pipe.layer
    check_layers(model, [asc_layer], "--asc-layer")
    run.write_config(cfg, "demo")

    _say(f"1/5 generating {len(pipe.extract_problems)} traces and caching thoughts at every layer")
    cache = pipe.cache()
    thoughts = _thought_section(pipe.extract_summary, cache)
    _say(f"    {len(cache)} thoughts: {cache.label_counts()}")

    _say("2/5 probing every layer (grouped CV, shuffled-label control)")
    key = {"cache": cache_key(cache), "folds": cfg.probe_folds, "seed": cfg.seed}

    def fit_probes() -> dict:
        report = probe_layers(cache.to_dict(), cache.labels, cache.groups,
                              n_folds=cfg.probe_folds, seed=cfg.seed, tsne=False)
        report.save(run.path / "probes")
        return report.to_json()

    probes = run.cached("probes", key, fit_probes, outputs=[run.path / "probes"])
    best = probes["best_layer"]
    _say(f"    best layer {best}")

    _say(f"3/5 SEAL at layer {best} vs base vs logits penalty on {len(pipe.eval_problems)} "
         "held-out problems")
    seal_vec = pipe.seal_vector(layer=best)
    seal_vec.save(run.path / "seal_vector")
    base = pipe.evaluate("base")
    seal = pipe.evaluate("seal", [seal_vec.intervention(model, scale=cfg.alpha)])
    bias = trigger_logit_bias(model.tokenizer, PenaltyConfig(penalty=cfg.penalty))
    penalty = pipe.evaluate("penalty", logit_bias=bias)

    _say(f"4/5 ASC at layer {asc_layer}: vector from {len(pipe.extract_toy)} pairs, gamma "
         "calibration")
    asc_vec = pipe.asc_vector(layer=asc_layer)
    asc_vec.save(run.path / "asc_vector")
    asc = pipe.evaluate("asc", [asc_vec.intervention(model)])
    gamma = pipe.asc_calibration(asc_vec)
    selected = None
    if cfg.gamma_grid:
        _say(f"    choosing a fixed gamma among {cfg.gamma_grid} on {cfg.n_val} "
             "validation problems")
        vbase, grid, g = pipe.validation_grid(asc_vec, cfg.gamma_grid, cfg.val_margin)
        if g is not None:
            selected = {"gamma": g, "steered": pipe.evaluate(
                f"asc-g{g:g}", [asc_vec.intervention(model, scale=g)])}
        val_rows = {"base": _brief(vbase), **{f"{k:g}": _brief(v) for k, v in grid.items()}}

    from experiments.patch import demo_studies

    _say("    ablation (attention/MLP per layer) and delimiter-state patching")
    studies, studies_md = demo_studies(pipe)
    _say("5/5 writing the report")
    merge_records(run, ["base", "seal", "penalty", "asc"]
                  + ([f"asc-g{selected['gamma']:g}"] if selected else []))
    metrics = {
        "model": model.describe(),
        "thoughts": thoughts,
        "probes": {"best_layer": best, "layers": probes["layers"]},
        "seal": {"layer": best, "alpha": cfg.alpha, "vector_norm": seal_vec.norm,
                 "base": base, "steered": seal, "penalty": penalty,
                 "change": changes(base, seal)},
        "asc": {"layer": asc_layer, **gamma, "epsilon": cfg.epsilon, "base": base,
                "steered": asc, "change": changes(base, asc),
                "selected": None if selected is None else {
                    **selected, "change": changes(base, selected["steered"]),
                    "rule": f"shortest validation traces within {cfg.val_margin:g} accuracy "
                            "points of validation base"},
                "validation": val_rows if cfg.gamma_grid else None},
        "studies": studies,
        "wall_time_s": time.perf_counter() - t0,
    }
    run.write_metrics(metrics)
    run.save_figure(_thought_figure(thoughts), "thoughts.png")
    run.save_figure(_conditions_figure(base, seal, penalty, asc,
                                       selected and selected["steered"]), "steering.png")
    run.write_report(_report(cfg, metrics) + studies_md)
    _say(f"done in {metrics['wall_time_s']:.0f} s; metrics: {run.path / 'metrics.json'}")
    return run.path


def _thought_section(summary: dict, cache) -> dict:
    by = summary.get("by_correctness", {})
    return {"n_traces": summary["n"], "accuracy": summary["accuracy"],
            "n_thoughts": len(cache), "label_counts": cache.label_counts(),
            "per_trace": summary["thoughts_per_trace"],
            "by_correctness": {k: {"n": v.get("n"), "per_trace": v.get("thoughts_per_trace")}
                               for k, v in by.items()}}


def _brief(summary: dict) -> dict:
    return {"accuracy": summary["accuracy"], "mean_tokens": summary["mean_tokens"]}





def _thought_figure(thoughts: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds = list(LABELS)
    groups = [k for k in ("correct", "incorrect") if k in thoughts["by_correctness"]]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    x = np.arange(len(kinds))
    for i, g in enumerate(groups):
        per = thoughts["by_correctness"][g]["per_trace"] or {}
        n = thoughts["by_correctness"][g]["n"]
        ax.bar(x + (i - 0.5) * 0.4, [per.get(k) or 0 for k in kinds], 0.4,
               label=f"{g} traces (n={n})")
    ax.set_xticks(x, kinds)
    ax.set_ylabel("thoughts per trace")
    ax.legend()
    ax.set_title("Thought types in the model's own traces")
    fig.tight_layout()
    return fig


def _conditions_figure(base, seal, penalty, asc, asc_selected=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["base", "SEAL", "penalty", "ASC (KL γ)"] + (["ASC (val γ)"] if asc_selected else [])
    rows = [base, seal, penalty, asc] + ([asc_selected] if asc_selected else [])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key, title in zip(axes, ("accuracy", "mean_tokens",
                                     "reflection_transition_per_trace"),
                              ("accuracy", "mean generated tokens",
                               "reflection + transition / trace"), strict=True):
        ax.bar(names, [r[key] for r in rows], color=["grey", "tab:blue", "tab:purple",
                                                       "tab:orange", "tab:red"][:len(rows)])
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def _pm(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1f}"


def _report(cfg: DemoConfig, m: dict) -> str:
    th, seal, asc = m["thoughts"], m["seal"], m["asc"]
    best = next(r for r in m["probes"]["layers"] if r["layer"] == m["probes"]["best_layer"])

    def row(name, s):
        t = s["thoughts_per_trace"]
        return {"condition": name, "accuracy": s["accuracy"], "mean tokens": s["mean_tokens"],
                "reflection/trace": t.get("reflection") or 0.0,
                "transition/trace": t.get("transition") or 0.0}

    table = markdown_table([row("base", seal["base"]), row(f"SEAL (layer {seal['layer']}, "
                                                           f"α={seal['alpha']})", seal["steered"]),
                            row(f"logits penalty ({cfg.penalty})", seal["penalty"]),
                            row(f"ASC (layer {asc['layer']}, KL-bound γ={asc['gamma']:.3g})",
                                asc["steered"])]
                           + ([row(f"ASC (layer {asc['layer']}, validation γ="
                                   f"{asc['selected']['gamma']:g})", asc["selected"]["steered"])]
                              if asc.get("selected") else []))
    sc, ac = seal["change"], asc["change"]
    sel = asc.get("selected")
    sel_text = (f"\nASC with the fixed γ = {sel['gamma']:g} chosen on {cfg.n_val} validation "
                f"problems ({sel['rule']}): mean tokens {_pm(sel['change']['mean_tokens_pct'])}%, "
                f"accuracy {_pm(sel['change']['accuracy_points'])} points." if sel else
                f"\nNo fixed γ kept validation accuracy within {cfg.val_margin:g} points of base."
                if asc.get("validation") else "")
    if asc.get("validation"):
        sel_text += ("\n\nASC strength on the validation split (never the held-out problems):\n\n"
                     + markdown_table([{"γ": k, "accuracy": v["accuracy"],
                                        "mean tokens": v["mean_tokens"]}
                                       for k, v in asc["validation"].items()]))
    return f"""# lens_steer demo: {m['model']['model']}

Backend `{m['model']['backend']}`, {m['model']['n_layers']} layers, d_model
{m['model']['d_model']}. Wall time {m['wall_time_s']:.0f} s. The toy reasoner is a
demonstration model trained by this project (see docs/toy_model.md).

## 1. Thoughts in the model's own traces

{th['n_traces']} greedy traces on the extraction split (accuracy {th['accuracy']:.3f});
{th['n_thoughts']} thoughts: {th['label_counts']}.

![thoughts](thoughts.png)

## 2. Where are thought types separable?

Linear probes at the delimiter opening each thought, {cfg.probe_folds}-fold CV grouped by
trace. Best layer **{m['probes']['best_layer']}**: balanced accuracy
{best.get('balanced_accuracy_mean', float('nan')):.3f}, accuracy
{best.get('accuracy_mean', float('nan')):.3f} vs shuffled-label control
{best.get('control_accuracy_mean', float('nan')):.3f}.

![layer curve](probes/layer_curve.png)

## 3. Steering on {seal['base']['n']} held-out problems

{table}
SEAL: reflection + transition per trace {_pm(sc['reflection_transition_pct'])}%, mean tokens
{_pm(sc['mean_tokens_pct'])}%, accuracy {_pm(sc['accuracy_points'])} points.
ASC: mean tokens {_pm(ac['mean_tokens_pct'])}%, accuracy {_pm(ac['accuracy_points'])} points;
γ = {asc['gamma']:.4g} from the KL bound with ε = {asc['epsilon']:g} (α = {asc['alpha']:.4g},
L = {asc['L']:.4g}).{sel_text}

![steering](steering.png)

Per-problem records: `records.jsonl`; vectors: `seal_vector.*`, `asc_vector.*`.
"""
