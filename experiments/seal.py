"""`lens-steer seal`: extract a SEAL vector on the extraction split, then compare base,
SEAL-steered and logits-penalty generation on the held-out split.

    lens-steer seal --model toy --out runs/seal
    lens-steer seal --model toy --out runs/seal --layer 3 --alpha 1.0 --ablation
    lens-steer seal --model DIR --backend nnsight --device-map auto --dtype bf16 --out runs/x
    lens-steer seal --preset seal-qwq-32b-preview --out runs/qwq   # official sites and region

`--read-site` / `--write-site` (hook names, e.g. `blocks.20.hook_resid_pre`; default
`resid_post` of `--layer`) say where S is read and added; `--think-region all` counts the whole
generation as thinking (tokenizers without `<think>`), "auto" picks it when `<think>` is missing.

Steps (each a resumable stage of the run folder, keyed by its settings): the model's own greedy
traces on `--n-extract` extraction problems (or `--traces FILE`, JSONL with `text` and optional
`correct`; or `--trace-source reference`), a thought cache of `resid_post` at the layer,
S = mean(execution) - mean(reflection ∪ transition), then `--n-eval` held-out problems base /
steered (alpha·S at delimiters inside <think>) / penalty (logit bias on trigger words). The
splits are the ones every study shares (`experiments.common.Splits`). The run folder gets
config.json, metrics.json, records.jsonl, seal_vector.*, a PNG and report.md.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.common import SealOptions, SteerSites, StudyConfig
from experiments.config import field, register_command
from experiments.pipeline import THOUGHT_TYPES, SteeringPipeline, merge_records, refl_trans
from experiments.run_folder import RunFolder
from lens_steer.errors import ConfigError, DataError

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend


def _labeller_names() -> list[str]:
    import lens_steer.thoughts  # noqa: F401  (registers the built-in labellers)
    from lens_steer.registry import LABELLERS

    return LABELLERS.names()


@dataclasses.dataclass
class SealStudyConfig(SteerSites, SealOptions, StudyConfig):
    """seal"""

    think_region: str = field("think", choices=("think", "all", "auto"))
    """Where thoughts are cut and S is applied: "think" (delimiters inside <think>), "all" (the
    whole generation counts as thinking: the official code on QwQ-32B-Preview, whose tokenizer
    has no <think> token), "auto" ("think" when the tokenizer has a <think> token, else
    "all")."""
    labeller: str = field("seal", choices=_labeller_names)
    """Thought labeller of the extraction cache: "seal" (corrected) or "seal-official" (the
    official rules, typo included; the presets' faithful mode)."""

    ablation: bool = False
    """Also evaluate the other two variants."""
    traces: str | None = None
    """JSONL extraction traces instead of generating them: rows {"prompt", "response",
    "correct", "id"?} (`lens_steer.traces`) or {"text" (incl. prompt), "correct"?}."""
    trace_selection: str = field("all", choices=("all", "first", "balanced"))
    """Which `--traces` rows build the vector (`lens_steer.traces.select_traces`): "all", or
    "first" / "balanced" `--traces-per-class` correct + incorrect (SEAL: the first 500 each)."""
    traces_per_class: int | None = field(None, minimum=1)
    """Traces per class for "first" / "balanced" (None: as many as the smaller class allows)."""
    trace_source: str = field("model", choices=("model", "reference"))
    """Extraction traces: the model's own greedy traces, or the toy problems' reference verbose
    traces."""
    penalty: float = -3.0
    """Logit bias of the trigger tokens (logits-penalty baseline)."""
    triggers: list[str] = field(default_factory=lambda: ["wait", "alternatively"])
    """Trigger words of the logits-penalty baseline."""
    speed_prompts: int = field(16, minimum=0)
    """Prompts of the fixed-length steered/unsteered timing (0 = skip)."""


# -- shared helpers (also used by experiments.asc) -----------------------------------------------
def time_ratio(model: ModelBackend, prompts: Sequence[str], interventions: Sequence[Any],
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


def condition_block(summary: dict[str, Any]) -> dict[str, Any]:
    """The metrics.json block of one condition (the summary, with the headline keys first)."""
    return {"accuracy": summary["accuracy"], "mean_tokens": summary["mean_tokens"],
            "thoughts_per_trace": summary["thoughts_per_trace"],
            "reflection_transition_per_trace": refl_trans(summary),
            **{k: v for k, v in summary.items()
               if k not in ("accuracy", "mean_tokens", "thoughts_per_trace")}}


def plot_conditions(path: Path, blocks: dict[str, dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(blocks)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        vals = [blocks[name]["thoughts_per_trace"].get(t) or 0 for t in THOUGHT_TYPES]
        ax1.bar([i + k * width for i in range(len(THOUGHT_TYPES))], vals, width, label=name)
    ax1.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(THOUGHT_TYPES))], THOUGHT_TYPES)
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


# -- the command ----------------------------------------------------------------------------------
def register(subparsers) -> None:
    register_command(subparsers, "seal",
                     "SEAL steering vs base vs logits penalty on held-out problems",
                     SealStudyConfig, run_seal)


def run_seal(cfg: SealStudyConfig, out: Path, model: ModelBackend | None = None) -> Path:
    from lens_steer.io import read_jsonl
    from lens_steer.steering import (
        PenaltyConfig,
        extract_seal_vector,
        seal_intervention,
        trigger_logit_bias,
    )
    from lens_steer.steering.seal import SealConfig

    t_start = time.perf_counter()
    if cfg.traces and not Path(cfg.traces).is_file():
        raise ConfigError(f"--traces {cfg.traces}: no such file")
    run = RunFolder(out)
    pipe = SteeringPipeline(cfg, run, model)
    model, layer = pipe.model, pipe.layer
    region = think_region(model, cfg.think_region)  # refuses "think" without <think>, early
    read_site = pipe.read_site or f"blocks.{layer}.hook_resid_post"
    penalty_cfg = PenaltyConfig(triggers=tuple(cfg.triggers), penalty=cfg.penalty)
    run.write_config(cfg, "seal")

    # 1. extraction traces and their thought cache at the layer
    if cfg.traces:
        traces = read_jsonl(cfg.traces)
        if traces and all(isinstance(t, dict) and "text" not in t for t in traces):
            from lens_steer.traces import read_traces, select_traces  # {prompt, response, ...}

            chosen = select_traces(read_traces(cfg.traces), cfg.trace_selection,
                                   cfg.traces_per_class, seed=cfg.seed)
            traces = [t.to_cache() for t in chosen]
        elif cfg.trace_selection != "all":
            raise ConfigError("--trace-selection needs {prompt, response, correct} trace rows "
                              f"(lens_steer.traces); {cfg.traces} has 'text' rows")
        if not traces:
            raise DataError(f"{cfg.traces} holds no traces: one JSON object per line with "
                            "'text' (and optional 'correct')")
        data = {"traces_file": str(cfg.traces), "n": len(traces),
                "selection": cfg.trace_selection, "per_class": cfg.traces_per_class}
    elif cfg.trace_source == "reference":
        traces = [{"id": p.id, "text": t.prompt + t.verbose_trace, "correct": t.verbose_correct}
                  for p, t in zip(pipe.extract_problems, pipe.extract_toy, strict=True)]
        data = {"source": "reference verbose traces"}
    else:
        print(f"[seal] generating {len(pipe.extract_problems)} extraction traces ...", flush=True)
        traces, summary = pipe.extraction_traces()
        data = {"source": "model greedy traces", "accuracy": summary["accuracy"]}
    data |= {"extract_seed": cfg.extract_seed, "n_traces": len(traces),
             "n_correct": sum(bool(t.get("correct")) for t in traces)}
    where = {"layers": [layer]} if pipe.read_site is None else {"sites": [pipe.read_site]}
    cache = pipe.cache(traces, think_only=region != "all", labeler=cfg.labeller, **where)
    vec = pipe.seal_vector(cache=cache, data=data)
    vec.save(run.path / "seal_vector")
    print(f"[seal] S read at {read_site}, added at {vec.site} (delimiters: {region}): norm {vec.norm:.2f}, thoughts "
          f"{vec.provenance['thought_counts']}", flush=True)

    # 2. evaluate on the held-out split
    problems = pipe.eval_problems
    conditions: dict[str, tuple[list, dict]] = {
        "base": ([], {}),
        "steered": ([seal_intervention(model, vec, cfg.alpha, region=region)], {}),
        "penalty": ([], {"logit_bias": trigger_logit_bias(model.tokenizer, penalty_cfg)}),
    }
    if cfg.ablation:
        for variant in ("both", "reflection", "transition"):
            if variant != cfg.variant:
                v2 = extract_seal_vector(cache, config=SealConfig(layer=layer, variant=variant,
                                                                  alpha=cfg.alpha),
                                         data=data, model=model, read_site=pipe.read_site,
                                         write_site=pipe.write_site)
                v2.save(run.path / f"seal_vector_{variant}")
                conditions[f"steered_{variant}"] = ([seal_intervention(model, v2,
                                                                       region=region)], {})
    blocks = {}
    for name, (ivs, overrides) in conditions.items():
        print(f"[seal] evaluating {name} on {len(problems)} held-out problems ...", flush=True)
        summary = pipe.evaluate(name, ivs, **overrides)
        blocks[name] = condition_block(summary)
        print(f"[seal]   {name}: acc {summary['accuracy']:.3f}, tokens "
              f"{summary['mean_tokens']:.1f}, refl+trans/trace {refl_trans(summary):.2f}",
              flush=True)
    merge_records(run, list(conditions))
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
    if cfg.speed_prompts:
        from lens_steer.eval.datasets import format_prompt

        prompts = [format_prompt(p, cfg.template) for p in problems[:cfg.speed_prompts]]
        speed = time_ratio(model, prompts, conditions["steered"][0])
        speed["backend"] = model.name
    metrics = {**blocks, "changes": changes, "targets": targets,
               "vector": {"layer": layer, "read_site": read_site, "write_site": vec.site,
                          "think_region": region, "think_region_option": cfg.think_region,
                          "labeller": cfg.labeller,
                          "norm": vec.norm, "alpha": cfg.alpha, "variant": cfg.variant,
                          "thought_counts": vec.provenance["thought_counts"]},
               "training_data": data, "n_eval": len(problems), "eval_seed": cfg.eval_seed,
               "problem_ids": [p.id for p in problems], "model_info": model.describe(),
               "speed": speed, "wall_time_s": time.perf_counter() - t_start}
    run.write_metrics(metrics)
    plot_conditions(run.path / "seal.png", blocks, f"SEAL on {cfg.model} (layer {layer}, "
                                                   f"alpha {cfg.alpha}), n={len(problems)}")
    run.write_report(_report(cfg, layer, vec, blocks, changes, targets, speed, data,
                             read_site, region))
    print(f"[seal] wrote {run.path}/metrics.json; targets {targets}")
    return run.path


def think_region(model: ModelBackend, option: str) -> str:
    """The think region `option` resolves to on `model`'s tokenizer ("think" or "all"); a
    one-line `ConfigError` before any forward when "think" has no `<think>` token."""
    from lens_steer.thoughts import think_region_predicate, think_token_ids

    think_region_predicate(model.tokenizer, option)
    if option == "auto":
        return "think" if think_token_ids(model.tokenizer)[0] is not None else "all"
    return option


def _report(args: SealStudyConfig, layer, vec, blocks, changes, targets, speed, data,
            read_site: str | None = None, region: str = "think") -> str:
    ch = changes["steered"]
    read_site = read_site or f"blocks.{layer}.hook_resid_post"
    where = ("delimiter steps inside `<think>`" if region == "think" else
             "every delimiter step of the generation (think region: all; the whole generation "
             "counts as thinking)")
    lines = [
        f"# SEAL on `{args.model}`", "",
        f"S = mean(execution) - mean({'reflection ∪ transition' if args.variant == 'both' else args.variant})"
        f" of `{read_site}` at thought delimiters, from {data}. "
        f"‖S‖ = {vec.norm:.2f}; thoughts used: {vec.provenance['thought_counts']}. "
        f"Applied as {args.alpha}·S at `{vec.site}` on {where}. Penalty baseline: "
        f"{args.penalty} on tokens of {args.triggers}.", "",
        f"Held-out: {args.n_eval} problems, seed {args.eval_seed} (training split seed "
        f"{args.extract_seed}); greedy, max {args.max_new_tokens} new tokens, backend "
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
