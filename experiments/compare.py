"""`lens-steer compare`: efficient-reasoning methods x datasets on the same problems, graded by
the same path (`run_eval`), with the same token accounting (thinking, answer, trial tokens) and
the same seeds -> a table (accuracy, mean tokens, wall time, tokens saved per accuracy point) and
an accuracy-vs-tokens plot with its Pareto front.

    lens-steer compare --out runs/compare                       # toy, every method, n=30
    lens-steer compare --methods base b32=budget b64=budget deer \\
        --method-options b32.budget=32 b64.budget=64 deer.threshold=0.9 --out runs/cmp
    lens-steer compare --datasets livecodebench=mini --methods base budget --n-extract 0 ...

A method entry is a registered name (`lens_steer.registry.STEERING_METHODS`) or `label=name`
(the same method twice with other options); `--method-options label.key=value` sets an option
(`\\n` escapes work: the toy default `deer.triggers=\\n\\n` probes at thought boundaries, since
the toy reasoner rarely writes "Wait"). A dataset entry is a name (`toy`, `math500`, `gsm8k`,
`livecodebench`, ...) or `name=path` (local JSONL). Methods that learn (seal, asc) prepare on
the extraction split (toy: seed --extract-seed; files: the first --n-extract problems); every
method is evaluated on the same --n-eval held-out problems. With --samples k > 1 (and
--temperature > 0) each problem is decoded k times (seeds seed..seed+k-1) and pass@k is reported.

Each (method, dataset) cell is a stage of the run folder keyed by a fingerprint of every setting
that changes it (model, problems, generation, method options, samples): an interrupted run
resumes cell by cell, and a re-run with other settings recomputes the cells they change.
Outputs: config.json, metrics.json, cells/<label>__<dataset>.jsonl (records), compare.png,
report.md. See docs/compare.md.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.common import Generation, ModelOptions, as_eval_problems, toy_splits
from experiments.config import field, register_command
from experiments.run_folder import RunFolder, markdown_table
from lens_steer.errors import ConfigError

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend

DEFAULT_METHODS = ["base", "penalty", "seal", "asc", "cod", "deer", "budget"]


@dataclasses.dataclass
class CompareConfig(Generation, ModelOptions):
    """compare"""

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    """Methods to compare: registered names or label=name (see --help's description)."""
    method_options: list[str] = field(
        default_factory=lambda: ["deer.triggers=\\n\\n", "budget.budget=40"])
    """Options as label.key=value (value parsed as JSON, else a string with \\-escapes;
    comma-separated for tuple options)."""
    datasets: list[str] = field(default_factory=lambda: ["toy"])
    """Datasets: a name or name=path (local JSONL)."""
    templates: list[str] = field(default_factory=list)
    """Prompt template per dataset as dataset=template; default "toy" on toy, else "raw"."""
    n_extract: int = field(64, minimum=0)
    """Extraction problems for methods that learn (seal, asc)."""
    n_eval: int = field(30, minimum=1)
    """Held-out problems every method is evaluated on."""
    extract_seed: int = 1
    """Seed of the toy extraction split."""
    eval_seed: int = 2
    """Seed of the toy held-out split."""
    samples: int = field(1, minimum=1)
    """Decodes per problem (pass@k needs k samples; use --temperature > 0)."""
    temperature: float = field(0.0, minimum=0)
    """Sampling temperature (0 = greedy)."""


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        text = codecs.decode(raw, "unicode_escape")
        return tuple(text.split(",")) if "," in text else text


def method_specs(cfg: CompareConfig) -> dict[str, tuple[str, dict[str, Any]]]:
    """label -> (registered name, options), checked against the registry."""
    import lens_steer.methods  # noqa: F401 - registers the methods
    from lens_steer.registry import STEERING_METHODS

    specs: dict[str, tuple[str, dict[str, Any]]] = {}
    for entry in cfg.methods:
        label, _, name = entry.partition("=") if "=" in entry else (entry, "", entry)
        if name not in STEERING_METHODS:
            raise ConfigError(f"--methods {entry}: unknown method {name!r}; choose from "
                              f"{STEERING_METHODS.names()} (or label=name)")
        if label in specs:
            raise ConfigError(f"--methods: {label!r} twice; name the second label=name")
        specs[label] = (name, {})
    for opt in cfg.method_options:
        key, eq, raw = opt.partition("=")
        label, dot, name = key.partition(".")
        if not eq or not dot:
            raise ConfigError(f"--method-options {opt!r}: write label.key=value")
        if label not in specs:
            continue  # an option of a method not compared this time (e.g. a default)
        value = _parse_value(raw)
        if name == "triggers" and isinstance(value, str):
            value = (value,)
        specs[label][1][name] = value
    for name, opts in specs.values():
        STEERING_METHODS.get(name)(**opts)  # unknown options fail here, before any work
    return specs


def _dataset_specs(cfg: CompareConfig) -> dict[str, tuple[str, str | None, str]]:
    """dataset label -> (name, path, template)."""
    templates = dict(t.split("=", 1) for t in cfg.templates if "=" in t)
    out = {}
    for entry in cfg.datasets:
        name, _, path = entry.partition("=")
        out[name] = (name, path or None, templates.get(name, "toy" if name.startswith("toy")
                                                       else "raw"))
    return out


def load_splits(cfg: CompareConfig, name: str, path: str | None) -> tuple[list, list]:
    """(extraction, held-out) Problems of a dataset; toy extraction problems carry their
    verbose / concise reference traces (ASC's pairs)."""
    if name.startswith("toy"):
        ex, ev = toy_splits(cfg.model, max(cfg.n_extract, 1), cfg.n_eval, cfg.extract_seed,
                            cfg.eval_seed, name)
        extract = as_eval_problems(ex, "extract")[:cfg.n_extract]
        for p, t in zip(extract, ex, strict=False):
            p.meta.update(verbose_trace=t.verbose_trace, concise_trace=t.concise_trace)
        return extract, as_eval_problems(ev, "eval")
    from lens_steer.eval.datasets import load_dataset

    problems = load_dataset(name, path=path)
    extract, evals = problems[:cfg.n_extract], problems[cfg.n_extract:cfg.n_extract + cfg.n_eval]
    if not evals:
        raise ConfigError(f"{name} has {len(problems)} problems: none left for evaluation "
                          f"after --n-extract {cfg.n_extract}")
    return extract, evals


def _cell(cfg: CompareConfig, model: ModelBackend, run: RunFolder, label: str, name: str,
          opts: dict[str, Any], ds: str, template: str, extract: list, evals: list
          ) -> dict[str, Any]:
    from lens_steer.eval.code import pass_at_k_summary
    from lens_steer.methods import evaluate_method
    from lens_steer.registry import STEERING_METHODS

    method = STEERING_METHODS.get(name)(**opts)
    gen = cfg.generation_config(temperature=cfg.temperature)
    t0 = time.perf_counter()
    prep = method.prepare(model, extract, run.path / "prep" / f"{label}__{ds}", gen,
                          template=template, dataset=ds)
    prep_s = time.perf_counter() - t0
    rows, wall = [], 0.0
    for s in range(cfg.samples):
        records, summary = evaluate_method(method, model, evals, ds, template=template,
                                           config=dataclasses.replace(gen, seed=cfg.seed + s))
        wall += summary["wall_time_s"] or 0.0
        rows += [{"sample": s, **r.to_dict()} for r in records]
    run.write_records(rows, f"cells/{label}__{ds}.jsonl")
    tok = [r["meta"]["tokens"] for r in rows]
    mean = {k: sum(t[k] for t in tok) / len(tok) for k in ("thinking", "answer", "trial", "total")}
    ks = sorted({1, cfg.samples})
    return {"method": label, "registered": name, "options": method.settings(),
            "dataset": ds, "n": len(evals), "samples": cfg.samples,
            "accuracy": sum(r["correct"] for r in rows) / len(rows),
            **pass_at_k_summary(rows, ks), "mean_tokens": mean["total"],
            "mean_thinking_tokens": mean["thinking"], "mean_answer_tokens": mean["answer"],
            "mean_trial_tokens": mean["trial"], "wall_time_s": wall, "prepare_s": prep_s,
            "prepare": prep}


def saved_per_point(cell: dict[str, Any], base: dict[str, Any] | None) -> str:
    """Tokens saved per accuracy point lost against base ("no loss" when none is lost)."""
    if base is None or cell is base:
        return "-"
    saved = base["mean_tokens"] - cell["mean_tokens"]
    lost = 100 * (base["accuracy"] - cell["accuracy"])
    if saved < 0:
        return "costs more"
    if lost <= 0:
        return "same" if saved == 0 and lost == 0 else "no loss"
    return f"{saved / lost:.1f}"


def pareto(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cells no other cell beats on both accuracy (>=) and mean tokens (<=), by tokens."""
    front = [c for c in cells if not any(
        o is not c and o["accuracy"] >= c["accuracy"] and o["mean_tokens"] <= c["mean_tokens"]
        and (o["accuracy"] > c["accuracy"] or o["mean_tokens"] < c["mean_tokens"])
        for o in cells)]
    return sorted(front, key=lambda c: c["mean_tokens"])


def plot(run: RunFolder, by_ds: dict[str, list[dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_ds), figsize=(5.5 * len(by_ds), 4.2), squeeze=False)
    for ax, (ds, cells) in zip(axes[0], by_ds.items(), strict=True):
        for i, c in enumerate(cells):
            ax.scatter(c["mean_tokens"], 100 * c["accuracy"], color=f"C{i % 10}", zorder=3)
            ax.annotate(c["method"], (c["mean_tokens"], 100 * c["accuracy"]),
                        textcoords="offset points", xytext=(4, 4 - 10 * (i % 3)), fontsize=8)
        front = pareto(cells)
        ax.step([c["mean_tokens"] for c in front], [100 * c["accuracy"] for c in front],
                where="post", color="k", lw=1, ls="--", label="Pareto front")
        ax.set(xlabel="mean tokens per problem (thinking + answer + trial)",
               ylabel="accuracy (%)", title=ds)
        ax.legend(fontsize=8)
    fig.tight_layout()
    run.save_figure(fig, "compare.png")


def run_compare(cfg: CompareConfig, out: Path) -> Path:
    from lens_steer.io import folder_lock

    specs = method_specs(cfg)
    datasets = _dataset_specs(cfg)
    with folder_lock(out):
        run = RunFolder(out, cfg, command="compare")
        model = None
        cells: list[dict[str, Any]] = []
        for ds, (name, path, template) in datasets.items():
            extract, evals = load_splits(cfg, name, path)
            for label, (mname, opts) in specs.items():
                key = {"model": cfg.identity(), "dataset": [name, path, template],
                       "extract": [p.id for p in extract], "eval": [p.id for p in evals],
                       "eval_questions": [p.question for p in evals],
                       "generation": dataclasses.asdict(cfg.generation_config(
                           temperature=cfg.temperature)),
                       "samples": cfg.samples, "method": mname, "options": opts}

                def compute(label=label, mname=mname, opts=opts, ds=ds, template=template,
                            extract=extract, evals=evals) -> dict[str, Any]:
                    nonlocal model
                    if model is None:
                        model = cfg.load()
                    print(f"[compare] {label} on {ds} ({len(evals)} problems) ...", flush=True)
                    return _cell(cfg, model, run, label, mname, opts, ds, template, extract,
                                 evals)

                cell = run.cached(f"cell-{label}__{ds}", key, compute)
                cells.append(cell)
                print(f"[compare]   {label} on {ds}: acc {cell['accuracy']:.3f}, tokens "
                      f"{cell['mean_tokens']:.1f} (trial {cell['mean_trial_tokens']:.1f}), "
                      f"{cell['wall_time_s']:.1f} s", flush=True)
        by_ds: dict[str, list[dict[str, Any]]] = {}
        for c in cells:
            by_ds.setdefault(c["dataset"], []).append(c)
        for ds_cells in by_ds.values():
            base = next((c for c in ds_cells if c["registered"] == "base"), None)
            front = {id(c) for c in pareto(ds_cells)}
            for c in ds_cells:
                c["tokens_saved_per_accuracy_point"] = saved_per_point(c, base)
                c["pareto"] = id(c) in front
        run.write_metrics({"cells": cells, "pareto": {ds: [c["method"] for c in pareto(v)]
                                                      for ds, v in by_ds.items()}})
        plot(run, by_ds)
        run.write_report(report(cfg, by_ds))
    return run.path


def report(cfg: CompareConfig, by_ds: dict[str, list[dict[str, Any]]]) -> str:
    cols = ["method", "accuracy", "mean_tokens", "mean_thinking_tokens", "mean_answer_tokens",
            "mean_trial_tokens", "wall_time_s", "tokens_saved_per_accuracy_point", "pareto"]
    if cfg.samples > 1:
        cols.insert(2, f"pass@{cfg.samples}")
    lines = [f"# compare on `{cfg.model}`", "",
             f"{cfg.n_eval} held-out problems per dataset, the same for every method; "
             f"{cfg.samples} sample(s) per problem, temperature {cfg.temperature:g}, max "
             f"{cfg.max_new_tokens} new tokens, seed {cfg.seed}. Tokens count everything a "
             "method decoded: thinking, answer and trial (DEER's probe answers) tokens. "
             "Tokens saved per accuracy point: (base tokens - tokens) / (base accuracy - "
             "accuracy, in points).", ""]
    for ds, cells in by_ds.items():
        lines += [f"## {ds}", "", markdown_table(cells, cols)]
    lines += ["![accuracy vs tokens](compare.png)", ""]
    return "\n".join(lines)


def register(sub) -> None:
    register_command(sub, "compare", "methods x datasets: accuracy vs tokens, one grader",
                     CompareConfig, run_compare)
