"""Efficient-reasoning methods behind one protocol, so studies and `lens-steer compare` put them
side by side under one grader and one token count.

A `Method` is built from its options (`STEERING_METHODS.get(name)(**options)`), `prepare`d on
extraction problems (SEAL: cache the model's own traces and take S; ASC: paired traces; the
rest: nothing to learn) and then `generate`s for evaluation prompts through
`ModelBackend.generate` only. Its result is a `GenerationResult` whose `tokens` say what each
sequence cost: thinking tokens (before the end-of-thinking marker, forced "Wait"s included),
answer tokens (the marker on), and trial tokens (DEER's probe answers, forced prefix included);
`n_generated` is their sum, so accuracy-per-token numbers charge every token a method paid for.

| name      | what                                                                              |
|-----------|-----------------------------------------------------------------------------------|
| `base`    | plain decoding                                                                    |
| `penalty` | logits penalty on reflection/transition trigger tokens (SEAL's baseline)          |
| `seal`    | SEAL vector at thought delimiters (`lens_steer.steering.seal`)                     |
| `asc`     | ASC concise direction with KL-calibrated or fixed strength (`...steering.asc`)     |
| `cod`     | Chain of Draft: an instruction asking for minimal drafts (<= 5 words) per step     |
| `deer`    | DEER early exit: at each trigger ("Wait") try the answer, stop when confident      |
| `budget`  | s1 budget forcing: cap thinking at N tokens and/or extend it with "Wait" up to N   |

    method = STEERING_METHODS.get("budget")(budget=128, mode="cap")
    method.prepare(model, extraction_problems, work_dir)
    records, summary = evaluate_method(method, model, problems, "toy", template="toy", config=cfg)

DEER and budget forcing live in `lens_steer.methods.phased`: they
run on top of `ModelBackend.generate` with stop strings and continued prompts (token ids), so
each continuation re-reads its prefix; token counts are exact, wall times an upper bound.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lens_steer.backends.base import GenerationConfig, GenerationResult, ModelBackend
from lens_steer.errors import ConfigError
from lens_steer.registry import STEERING_METHODS

__all__ = ["TokenCount", "MethodResult", "Method", "BaseMethod", "evaluate_method",
           "thinking_split", "Base", "Penalty", "Seal", "Asc", "ChainOfDraft", "END_THINK"]

END_THINK = "</think>"


@dataclass
class TokenCount:
    """What one sequence cost, in tokens."""

    thinking: int
    answer: int
    trial: int = 0

    @property
    def total(self) -> int:
        return self.thinking + self.answer + self.trial


@dataclass
class MethodResult(GenerationResult):
    """A `GenerationResult` with the token accounting; `n_generated` is the total cost."""

    tokens: list[TokenCount] = field(default_factory=list)

    @property
    def n_generated(self) -> list[int]:
        return [t.total for t in self.tokens]


@runtime_checkable
class Method(Protocol):
    name: str

    def prepare(self, model: ModelBackend, problems: Sequence[Any], work_dir: Path,
                config: GenerationConfig | None = None, template: str = "raw",
                dataset: str | None = None) -> dict[str, Any]:
        """Learn what the method needs from extraction problems; returns its provenance."""

    def generate(self, model: ModelBackend, prompts: Sequence[str],
                 config: GenerationConfig | None = None, interventions: Sequence[Any] = (),
                 progress: bool = False) -> MethodResult:
        """Decode `prompts` (formatted) the method's way."""

    def settings(self) -> dict[str, Any]:
        """Every option that changes its results (for run-folder fingerprints)."""


# -- token accounting ---------------------------------------------------------------------------
def _marker_index(model: ModelBackend, ids: Sequence[int], marker: str) -> int | None:
    """Index of the token where the first `marker` starts in `ids`, or None."""
    pieces = model.token_strings(ids)
    text = "".join(pieces)
    at = text.find(marker)
    if at < 0:
        return None
    pos = 0
    for k, piece in enumerate(pieces):
        if pos + len(piece) > at:
            return k
        pos += len(piece)
    return None


def thinking_split(model: ModelBackend, ids: Sequence[int], marker: str = END_THINK) -> TokenCount:
    """Thinking = tokens before the first `marker`, answer = the rest (all thinking when the
    trace never closed its thinking)."""
    ids = [i for i in ids if i != model.tokenizer.pad_token_id]
    k = _marker_index(model, ids, marker)
    return TokenCount(len(ids), 0) if k is None else TokenCount(k, len(ids) - k)


def _ids(model: ModelBackend, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    return [model.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]


def _finish(model: ModelBackend, prompt_ids: list[list[int]], gen: list[list[int]],
            reasons: list[str], tokens: list[TokenCount], wall: float) -> MethodResult:
    drop = {model.tokenizer.eos_token_id, model.tokenizer.pad_token_id}
    texts = [model.decode([i for i in g if i not in drop]) for g in gen]
    return MethodResult(prompt_ids=prompt_ids, generated_ids=gen, texts=texts,
                        finish_reasons=reasons, wall_time_s=wall, tokens=tokens)


# -- methods ------------------------------------------------------------------------------------
class BaseMethod:
    """Plain decoding; subclasses change the prompt, the config, the interventions or the
    decoding. Options are the dataclass fields of `Options`."""

    name = "base"

    @dataclass
    class Options:
        pass

    def __init__(self, **options: Any) -> None:
        known = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"method {self.name!r} has no option(s) {unknown}; its options: "
                              f"{sorted(known)}")
        self.options = self.Options(**options)
        self.interventions: list[Any] = []
        self.provenance: dict[str, Any] = {}

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, **asdict(self.options)}

    def prepare(self, model: ModelBackend, problems: Sequence[Any], work_dir: Path,
                config: GenerationConfig | None = None, template: str = "raw",
                dataset: str | None = None) -> dict[str, Any]:
        return {}

    def prompt(self, prompt: str) -> str:
        return prompt

    def gen_config(self, model: ModelBackend, config: GenerationConfig) -> GenerationConfig:
        return config

    def generate(self, model: ModelBackend, prompts: Sequence[str],
                 config: GenerationConfig | None = None, interventions: Sequence[Any] = (),
                 progress: bool = False) -> MethodResult:
        t0 = time.perf_counter()
        config = self.gen_config(model, config or GenerationConfig())
        out = model.generate([self.prompt(p) if isinstance(p, str) else p for p in prompts],
                             config, [*interventions, *self.interventions], progress=progress)
        tokens = [thinking_split(model, g) for g in out.generated_ids]
        res = _finish(model, out.prompt_ids, out.generated_ids, out.finish_reasons, tokens,
                      time.perf_counter() - t0)
        res.steered = out.steered
        return res


Base = BaseMethod


class Penalty(BaseMethod):
    """SEAL's logits-penalty baseline: a negative bias on trigger-word tokens at every step."""

    name = "penalty"

    @dataclass
    class Options:
        penalty: float = -3.0
        triggers: tuple[str, ...] = ("wait", "alternatively")

    def gen_config(self, model: ModelBackend, config: GenerationConfig) -> GenerationConfig:
        from lens_steer.steering.baselines import PenaltyConfig, trigger_logit_bias

        bias = trigger_logit_bias(model.tokenizer, PenaltyConfig(
            triggers=tuple(self.options.triggers), penalty=self.options.penalty))
        return dataclasses.replace(config, logit_bias={**(config.logit_bias or {}), **bias})


def _default_layer(model: ModelBackend) -> int:
    return max(0, min(model.n_layers - 1, round(2 * model.n_layers / 3)))


class Seal(BaseMethod):
    """SEAL: S from the model's own traces on the extraction problems, alpha*S at delimiters."""

    name = "seal"

    @dataclass
    class Options:
        layer: int | None = None
        alpha: float = 1.0
        variant: str = "both"

    def prepare(self, model: ModelBackend, problems: Sequence[Any], work_dir: Path,
                config: GenerationConfig | None = None, template: str = "raw",
                dataset: str | None = None) -> dict[str, Any]:
        from lens_steer.cache import CacheConfig, cache_thoughts, load_cache
        from lens_steer.eval.datasets import format_prompt
        from lens_steer.eval.runner import run_eval
        from lens_steer.steering.seal import SealConfig, extract_seal_vector, seal_intervention

        layer = _default_layer(model) if self.options.layer is None else self.options.layer
        dataset = dataset or problems[0].source or "toy"
        records, summary = run_eval(model, problems, dataset, template=template, config=config)
        traces = [{"id": str(p.id), "text": format_prompt(p, template) + r.generated_text,
                   "correct": bool(r.correct)} for p, r in zip(problems, records, strict=True)]
        cache_dir = Path(work_dir) / "seal_cache"
        cache_thoughts(model, traces, cache_dir, CacheConfig(layers=[layer], progress=False),
                       overwrite=True)
        cfg = SealConfig(layer=layer, variant=self.options.variant, alpha=self.options.alpha)
        vec = extract_seal_vector(load_cache(cache_dir), config=cfg, model=model,
                                  data={"n_traces": len(traces),
                                        "accuracy": summary["accuracy"]})
        vec.save(Path(work_dir) / "seal_vector")
        self.interventions = [seal_intervention(model, vec, self.options.alpha)]
        self.provenance = {"layer": layer, "norm": vec.norm,
                           "thought_counts": vec.provenance.get("thought_counts")}
        return self.provenance


class Asc(BaseMethod):
    """ASC: v from (verbose, concise) pairs in the problems' meta, gamma fixed or calibrated."""

    name = "asc"

    @dataclass
    class Options:
        layer: int | None = None
        gamma: float | None = None
        epsilon: float = 1e-3
        n_calibration: int = 20

    def prepare(self, model: ModelBackend, problems: Sequence[Any], work_dir: Path,
                config: GenerationConfig | None = None, template: str = "raw",
                dataset: str | None = None) -> dict[str, Any]:
        from lens_steer.eval.datasets import format_prompt
        from lens_steer.steering.asc import (
            AscConfig,
            asc_intervention,
            calibrate_gamma,
            extract_asc_vector,
            sample_states,
        )

        pairs = [(format_prompt(p, template), p.meta["verbose_trace"], p.meta["concise_trace"])
                 for p in problems if "verbose_trace" in p.meta and "concise_trace" in p.meta]
        if not pairs:
            raise ConfigError("asc needs (verbose, concise) trace pairs: extraction problems "
                              "with meta['verbose_trace'] and meta['concise_trace'] (the toy "
                              "problems carry them)")
        layer = _default_layer(model) if self.options.layer is None else self.options.layer
        cfg = AscConfig(layer=layer, gamma=self.options.gamma, epsilon=self.options.epsilon,
                        n_calibration=self.options.n_calibration)
        vec = extract_asc_vector(model, pairs, cfg, data={"n_pairs": len(pairs)})
        gamma = self.options.gamma
        if gamma is None:
            states = sample_states(model, [(p, v) for p, v, _ in pairs],
                                   self.options.n_calibration)
            gamma = calibrate_gamma(model, vec, states, epsilon=self.options.epsilon).gamma
        vec.scale = gamma
        vec.save(Path(work_dir) / "asc_vector")
        self.interventions = [asc_intervention(model, vec, gamma)]
        self.provenance = {"layer": layer, "gamma": gamma, "n_pairs": len(pairs)}
        return self.provenance


COD_INSTRUCTION = ("Think step by step, but write only a minimal draft of each step, five "
                   "words at most. Give the final answer after the reasoning.")


class ChainOfDraft(BaseMethod):
    """Chain of Draft (Xu et al., 2025): the prompt asks for a terse draft (<= N words) per
    step. The instruction goes before the assistant turn (or `<think>`), else at the end."""

    name = "cod"

    @dataclass
    class Options:
        instruction: str = COD_INSTRUCTION

    def prompt(self, prompt: str) -> str:
        for marker in ("<｜Assistant｜>", "<|im_end|>", "\n<think>"):
            if marker in prompt:
                head, tail = prompt.split(marker, 1)
                return f"{head}\n{self.options.instruction}{marker}{tail}"
        return f"{prompt}\n{self.options.instruction}\n"


for _cls in (BaseMethod, Penalty, Seal, Asc, ChainOfDraft):
    if _cls.name not in STEERING_METHODS:
        STEERING_METHODS.register(_cls.name, _cls)


# -- evaluation ---------------------------------------------------------------------------------
def evaluate_method(method: Method, model: ModelBackend, problems: Sequence[Any], dataset: str,
                    *, template: str = "raw", config: GenerationConfig | None = None,
                    progress: bool = False, **run_eval_kwargs: Any
                    ) -> tuple[list[Any], dict[str, Any]]:
    """`run_eval` with the method's decoding; each record's meta gets its token accounting and
    the summary gets mean thinking / answer / trial / total tokens."""
    from lens_steer.eval.runner import run_eval

    box: dict[str, MethodResult] = {}

    def generate(prompts, cfg=None, interventions=(), progress=False):
        box["r"] = method.generate(model, prompts, cfg, interventions, progress=progress)
        return box["r"]

    records, summary = run_eval(model, problems, dataset, template=template, config=config,
                                generate=generate, progress=progress, **run_eval_kwargs)
    toks = box["r"].tokens
    for rec, t in zip(records, toks, strict=True):
        rec.meta["tokens"] = {**asdict(t), "total": t.total}
    for key in ("thinking", "answer", "trial", "total"):
        vals = [getattr(t, key) for t in toks]
        summary[f"mean_{key}_tokens"] = sum(vals) / len(vals) if vals else None
    summary["method"] = method.settings()
    return records, summary
