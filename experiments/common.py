"""What every study shares: config files + CLI overrides, loading, generating labelled traces.

Configs are dataclasses with a docstring per field. `add_config_arguments` exposes each field
as a `--flag`; `resolve_config` merges defaults < `--config FILE` (TOML or JSON, e.g. a run
folder's `config.json`) < flags, so a saved run folder reproduces its run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lens_steer.eval.datasets import Problem, format_prompt, load_dataset


@dataclasses.dataclass
class StudyConfig:
    """Fields every study has."""

    model: str = "toy"
    """"toy", a local HF model directory, or a hub id."""
    backend: str = "transformer_lens"
    """"transformer_lens" or "nnsight"."""
    dataset: str = "toy"
    """"toy", "math500" or "gsm8k" (local JSONL via --dataset-path offline)."""
    dataset_path: str | None = None
    """Local JSONL for math500 / gsm8k."""
    template: str = "toy"
    """Prompt template: "toy", "r1", "raw" or a format string with {problem}."""
    n_extract: int = 300
    """Problems whose generated traces build the vectors / probes (extraction split)."""
    n_eval: int = 200
    """Held-out problems for evaluation."""
    extract_seed: int = 1
    """Seed of the extraction split (toy problems are generated from it)."""
    eval_seed: int = 2
    """Seed of the evaluation split; disjoint from the extraction split."""
    max_new_tokens: int = 320
    """Generation budget per trace."""
    batch_size: int = 64
    """Sequences per generation batch."""
    seed: int = 0
    """Global seed (sampling, probes)."""
    model_dtype: str | None = None
    """Weights dtype ("bf16", "fp16", "fp32"); None = fp32."""
    device_map: str | None = None
    """nnsight: "auto" (spread over visible GPUs) or a JSON module->device map."""
    remote: str | None = None
    """nnsight: "ndif" (NDIF execution; needs a hub id and NDIF_API_KEY) or "local"."""
    prefill_chunk: int | None = None
    """nnsight: feed long prompts through the KV cache in chunks of this many tokens."""

    def __post_init__(self) -> None:
        if self.n_extract < 1 or self.n_eval < 1:
            raise ValueError("n_extract and n_eval must be >= 1")
        if self.backend not in ("transformer_lens", "nnsight"):
            raise ValueError(f"unknown backend {self.backend!r}: use transformer_lens or nnsight")


def _field_type(tp: Any) -> tuple[Any, bool]:
    """(element parser, is_list) for a dataclass field annotation."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing), {})  # noqa: S307 - annotations of our own dataclasses
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _field_type(args[0])
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        args = typing.get_args(tp)
        return (args[0] if args else str), True
    return tp, False


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--field-name` flag per dataclass field (None = not given), plus `--config`."""
    parser.add_argument("--config", type=Path, help="TOML or JSON config (a run's config.json)")
    parser.add_argument("--out", type=Path, required=False, help="run folder")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        elem, is_list = _field_type(hints[f.name])
        kind = _bool if elem is bool else elem
        doc = _field_docs(cls).get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else None
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind,
                            nargs="+" if is_list else None, default=None,
                            help=f"{doc} (default: {default})")


def resolve_config(cls: type, args: argparse.Namespace) -> Any:
    """Defaults < --config file < flags."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        values = read_config_file(path)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"{path}: unknown config keys {unknown}; known: {sorted(known)}")
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return cls(**values)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML or JSON config file as a dict (a run folder's config.json works)."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"config file {path} does not exist")
    text = path.read_text()
    return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)


def config_defaults_from_file(parser: argparse.ArgumentParser, argv: list[str] | None,
                              args: argparse.Namespace) -> argparse.Namespace:
    """For argparse-style commands: `--config FILE` supplies defaults, flags still win."""
    sub = getattr(args, "_config_parser", None)
    if sub is None or not getattr(args, "config", None):
        return args
    values = read_config_file(args.config)
    known = {a.dest for a in sub._actions} - {"config", "help", "func", "_config_parser"}
    sub.set_defaults(**{k: v for k, v in values.items() if k in known})
    return parser.parse_args(argv)


def _field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal right after each field)."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(
                    getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = str(nxt.value.value).strip()
    return docs


# -- data ------------------------------------------------------------------------------------
TOY_VARIANTS = {"toy": (0, 99), "toy:short": (0, 3), "toy:long": (5, 99)}
"""Toy datasets by number of reasoning steps (min, max): transfer studies move between them."""


def toy_splits(model_source: str, n_extract: int, n_eval: int, extract_seed: int,
               eval_seed: int, variant: str = "toy", eval_variant: str | None = None
               ) -> tuple[list[Any], list[Any]]:
    """(extraction, evaluation) ToyProblems, disjoint from each other and from the model's own
    training questions (every stage; see `lens_steer.toy.evaluate.training_questions`)."""
    from lens_steer.backends.loading import resolve_source
    from lens_steer.toy.evaluate import heldout_problems, training_questions

    exclude = training_questions(resolve_source(model_source))

    def pick(n: int, seed: int, name: str, excl: set[str]) -> list[Any]:
        if name not in TOY_VARIANTS:
            raise ValueError(f"unknown toy dataset {name!r}; choose one of {sorted(TOY_VARIANTS)}")
        if name == "toy":
            return heldout_problems(n, seed, excl)
        lo, hi = TOY_VARIANTS[name]
        out: list[Any] = []
        k = 0
        while len(out) < n:
            out += [p for p in heldout_problems(4 * n, seed + 7919 * k, excl)
                    if lo <= len(p.steps) <= hi and p.question not in {q.question for q in out}]
            k += 1
        return out[:n]

    extract = pick(n_extract, extract_seed, variant, exclude)
    evaluate = pick(n_eval, eval_seed, eval_variant or variant,
                    exclude | {p.question for p in extract})
    return extract, evaluate


def validation_split(model_source: str, n: int, seed: int, used: set[str]) -> list[Any]:
    """`n` toy problems for choosing a strength: none of the model's training questions and
    none of `used` (the questions of the other splits)."""
    from lens_steer.backends.loading import resolve_source
    from lens_steer.toy.evaluate import heldout_problems, training_questions

    return heldout_problems(n, seed, used | training_questions(resolve_source(model_source)))


def default_layer(n_layers: int) -> int:
    """The steered layer when none is given: about 2/3 of the depth."""
    return max(0, min(n_layers - 1, round(2 * n_layers / 3)))


def as_eval_problems(toy: Sequence[Any], tag: str) -> list[Problem]:
    """ToyProblems as `lens_steer.eval` Problems (the toy prompt kept for the "toy" template)."""
    return [Problem(id=f"{tag}-{i}", question=p.question, answer=str(p.answer), source="toy",
                    meta={"prompt": p.prompt, "n_steps": len(p.steps)})
            for i, p in enumerate(toy)]


def split_problems(cfg: StudyConfig, eval_dataset: str | None = None
                   ) -> tuple[list[Problem], list[Problem]]:
    """(extraction, evaluation) problems. Toy: disjoint seeds; real datasets: disjoint slices."""
    if cfg.dataset.startswith("toy"):
        ex, ev = toy_splits(cfg.model, cfg.n_extract, cfg.n_eval, cfg.extract_seed,
                            cfg.eval_seed, cfg.dataset, eval_dataset)
        return as_eval_problems(ex, "extract"), as_eval_problems(ev, "eval")
    problems = load_dataset(cfg.dataset, path=cfg.dataset_path)
    if len(problems) < cfg.n_extract + 1:
        raise ValueError(f"{cfg.dataset} has {len(problems)} problems; need more than "
                         f"n_extract={cfg.n_extract}")
    return problems[:cfg.n_extract], problems[cfg.n_extract:cfg.n_extract + cfg.n_eval]


def prompts_for(problems: Sequence[Problem], template: str) -> list[str]:
    return [format_prompt(p, template) for p in problems]


def traces_from_records(problems: Sequence[Problem], prompts: Sequence[str],
                        records: Sequence[Any]) -> list[dict]:
    """Cache input from generations: full text (prompt + generation), id, correctness."""
    out = []
    for p, prompt, r in zip(problems, prompts, records, strict=True):
        r = r.to_dict() if hasattr(r, "to_dict") else r
        out.append({"id": str(p.id), "text": prompt + r["generated_text"],
                    "correct": bool(r["correct"])})
    return out


def load_study_model(cfg: StudyConfig):
    """Load the study's model with its backend options (see `lens_steer.backends.loading`)."""
    from lens_steer import load_model
    from lens_steer.backends.loading import backend_options

    return load_model(cfg.model, backend=cfg.backend, **backend_options(cfg))


def planned_batch_size(model, cfg: StudyConfig, prompt_tokens: int = 512) -> int:
    """Print the memory plan and return the largest safe batch <= cfg.batch_size (GPU only;
    fails early with the numbers when not even one sequence fits)."""
    from lens_steer.memory import choose_batch_size

    return choose_batch_size(model, cfg.batch_size,
                             max_tokens=prompt_tokens + cfg.max_new_tokens)


def generation_config(cfg: StudyConfig, **overrides: Any):
    from lens_steer import GenerationConfig

    return GenerationConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                            seed=cfg.seed, **overrides)


def generate_traces(model, problems: Sequence[Problem], cfg: StudyConfig, run, name: str,
                    interventions: Sequence[Any] = (), progress: bool = True,
                    **gen_overrides: Any) -> tuple[list[dict], dict]:
    """Generate, score and label traces once per run folder (resumable): (traces, summary).

    Writes `<name>_records.jsonl`; the traces (prompt + generation, id, correctness) feed the
    per-thought cache.
    """
    from lens_steer.eval.metrics import read_records
    from lens_steer.eval.runner import run_eval

    prompts = prompts_for(problems, cfg.template)
    path = run.path / f"{name}_records.jsonl"
    if run.done(f"generate-{name}") and path.exists():
        records = read_records(path)
        summary = run.result(f"generate-{name}")
    else:
        dataset = "toy" if cfg.dataset.startswith("toy") else cfg.dataset
        records, summary = run_eval(model, problems, dataset, template=cfg.template,
                                    config=generation_config(cfg, **gen_overrides),
                                    interventions=interventions, progress=progress)
        run.write_records([r.to_dict() for r in records], f"{name}_records.jsonl")
        run.mark_done(f"generate-{name}", summary)
    return traces_from_records(problems, prompts, records), summary


def register_study(sub: argparse._SubParsersAction, name: str, help: str, config_cls: type,
                   runner: Any) -> None:
    """Add the `name` subcommand: config flags, `--config`, `--out`; runs
    `runner(config, out_dir) -> run folder` and prints where the report is."""

    def main(args: argparse.Namespace) -> int:
        cfg = resolve_config(config_cls, args)
        out = runner(cfg, args.out or Path("runs") / name)
        print(f"[{name}] report: {Path(out) / 'report.md'}")
        return 0

    import sys

    p = sub.add_parser(name, help=help, description=sys.modules[runner.__module__].__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, config_cls)
    p.set_defaults(func=main)
