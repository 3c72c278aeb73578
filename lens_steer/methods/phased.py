"""Methods that decode in phases through `ModelBackend.generate` (stop strings, then continued
token-id prompts): DEER's early exit and s1 budget forcing. Registered in `STEERING_METHODS`
with the others of `lens_steer.methods`; each phase re-reads its prefix (no KV-cache reuse
across calls), so their token counts are exact and their wall times an upper bound.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lens_steer.backends.base import GenerationConfig, GenerationResult, ModelBackend
from lens_steer.errors import ConfigError
from lens_steer.methods.core import (
    END_THINK,
    BaseMethod,
    MethodResult,
    TokenCount,
    _finish,
    _ids,
    _marker_index,
)
from lens_steer.registry import STEERING_METHODS

__all__ = ["BudgetForcing", "Deer"]


class _Phased(BaseMethod):
    """Helpers for methods that decode in phases through `ModelBackend.generate`."""

    def _run(self, model: ModelBackend, contexts: list[list[int]], config: GenerationConfig,
             interventions: Sequence[Any], max_new: int, stops: tuple[str, ...]
             ) -> GenerationResult:
        cfg = dataclasses.replace(config, max_new_tokens=max(1, max_new),
                                  stop_strings=tuple(config.stop_strings) + stops)
        return model.generate(contexts, cfg, [*interventions, *self.interventions])

    def _answer(self, model: ModelBackend, contexts: list[list[int]], config: GenerationConfig,
                interventions: Sequence[Any], max_new: int) -> GenerationResult:
        return self._run(model, contexts, config, interventions, max_new, ())


def _end_ids(model: ModelBackend, think: list[int], end_text: str) -> list[int]:
    """`end_text` after the thinking, without its leading newlines when the thinking already
    ends with one (so a naturally closed trace reads as the model wrote it)."""
    if think and model.decode(think[-1:]).endswith("\n"):
        end_text = end_text.lstrip("\n")
    return model.encode(end_text)


def _strip_eos(model: ModelBackend, ids: list[int]) -> tuple[list[int], bool]:
    eos = model.tokenizer.eos_token_id
    return (ids[:ids.index(eos)], True) if eos in ids else (ids, False)


class BudgetForcing(_Phased):
    """s1 budget forcing (Muennighoff et al., 2025). `mode="cap"`: thinking stops at `budget`
    tokens by forcing `end_text`; "extend": an end of thinking before `budget` tokens is
    replaced by `extend_text` ("Wait"), at most `max_extensions` times; "both": exactly
    `budget` thinking tokens when the extensions suffice. The answer follows (<= `answer_tokens`)."""

    name = "budget"

    @dataclass
    class Options:
        budget: int = 256
        mode: str = "cap"
        extend_text: str = "Wait"
        end_text: str = "\n</think>\n\n"
        max_extensions: int = 2
        answer_tokens: int = 64

        def __post_init__(self) -> None:
            if self.mode not in ("cap", "extend", "both"):
                raise ConfigError(f"budget mode {self.mode!r}: choose cap, extend or both")
            if self.budget < 1 or self.answer_tokens < 1 or self.max_extensions < 0:
                raise ConfigError("budget and answer_tokens must be >= 1, max_extensions >= 0")

    def generate(self, model: ModelBackend, prompts: Sequence[str],
                 config: GenerationConfig | None = None, interventions: Sequence[Any] = (),
                 progress: bool = False) -> MethodResult:
        t0 = time.perf_counter()
        o, config = self.options, config or GenerationConfig()
        cap = o.mode in ("cap", "both")
        pids = _ids(model, prompts)
        think: list[list[int]] = [[] for _ in pids]
        ended = [False] * len(pids)   # the model closed its thinking by itself (last round)
        eos = [False] * len(pids)
        extensions = [0] * len(pids)
        todo = list(range(len(pids)))
        while todo:
            room = [o.budget - len(think[b]) if cap else config.max_new_tokens - len(think[b])
                    for b in todo]
            out = self._run(model, [pids[b] + think[b] for b in todo], config, interventions,
                            max(room), (END_THINK,))
            nxt = []
            for b, r, gen in zip(todo, room, out.generated_ids, strict=True):
                gen, eos[b] = _strip_eos(model, gen)
                k = _marker_index(model, gen, END_THINK)
                closed = k is not None and k < r
                think[b] += gen[:k] if closed else gen[:max(r, 0)]
                ended[b] = closed
                short = len(think[b]) < o.budget
                if (closed or eos[b]) and short and o.mode != "cap" \
                        and extensions[b] < o.max_extensions:
                    think[b] += model.encode(o.extend_text)
                    if cap:
                        think[b] = think[b][:o.budget]
                    extensions[b] += 1
                    eos[b] = False
                    if len(think[b]) < o.budget or not cap:
                        nxt.append(b)
            todo = nxt
        end = [_end_ids(model, t, o.end_text) for t in think]
        ans = self._answer(model, [pids[b] + think[b] + end[b] for b in range(len(pids))],
                           config, interventions, o.answer_tokens)
        gen = [think[b] + end[b] + ans.generated_ids[b] for b in range(len(pids))]
        tokens = [TokenCount(len(think[b]), len(end[b]) + len(ans.generated_ids[b]))
                  for b in range(len(pids))]
        res = _finish(model, pids, gen, ans.finish_reasons, tokens, time.perf_counter() - t0)
        res.extensions = extensions  # type: ignore[attr-defined]
        return res


class Deer(_Phased):
    """DEER (Yang et al., 2025): when thinking reaches a trigger ("Wait"), append `trial_text`
    (`</think>` + answer prefix) and greedily decode a trial answer (<= `trial_tokens`, up to
    `trial_stop`); when the mean probability of its tokens (the stop token excluded, as the
    official code's default "avg1") is >= `threshold`, thinking ends there, else the trace
    continues through the trigger. After `max_trials` trials a trace thinks on without probes.
    Every trial token (forced prefix and stop included) is cost."""

    name = "deer"

    @dataclass
    class Options:
        threshold: float = 0.95
        triggers: tuple[str, ...] = ("Wait",)
        trial_text: str = "\n</think>\n\n\\boxed{"
        trial_stop: str = "}"
        trial_tokens: int = 20
        max_trials: int = 10
        end_text: str = "\n</think>\n\n"
        answer_tokens: int = 64

        def __post_init__(self) -> None:
            if not 0 < self.threshold <= 1 or not math.isfinite(self.threshold):
                raise ConfigError(f"deer threshold must be in (0, 1], got {self.threshold}")
            if not self.triggers:
                raise ConfigError("deer needs at least one trigger, e.g. ('Wait',)")

    def _confidence(self, model: ModelBackend, contexts: list[list[int]],
                    answers: list[list[int]]) -> list[float]:
        logits = model.logits([c + a for c, a in zip(contexts, answers, strict=True)])
        out = []
        for c, a, lg in zip(contexts, answers, logits, strict=True):
            if not a:
                out.append(0.0)
                continue
            probs = torch.softmax(lg[len(c) - 1:len(c) + len(a) - 1].float(), dim=-1)
            out.append(float(probs[torch.arange(len(a)), torch.tensor(a)].mean()))
        return out

    def generate(self, model: ModelBackend, prompts: Sequence[str],
                 config: GenerationConfig | None = None, interventions: Sequence[Any] = (),
                 progress: bool = False) -> MethodResult:
        t0 = time.perf_counter()
        o, config = self.options, config or GenerationConfig()
        pids = _ids(model, prompts)
        n = len(pids)
        think: list[list[int]] = [[] for _ in range(n)]
        trial = [0] * n
        exits: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        eos = [False] * n
        trial_ids = model.encode(o.trial_text)
        todo = list(range(n))
        while todo:
            room = [config.max_new_tokens - len(think[b]) for b in todo]
            out = self._run(model, [pids[b] + think[b] for b in todo], config, interventions,
                            max(room), (END_THINK, *o.triggers))
            probes: list[tuple[int, list[int], list[int]]] = []
            nxt = []
            for b, r, gen in zip(todo, room, out.generated_ids, strict=True):
                gen, eos[b] = _strip_eos(model, gen)
                gen = gen[:max(r, 0)]
                k_end = _marker_index(model, gen, END_THINK)
                ks = [k for t in o.triggers if (k := _marker_index(model, gen, t)) is not None]
                k_trig = min(ks) if ks else None
                if k_trig is not None and (k_end is None or k_trig < k_end) and not eos[b] \
                        and len(think[b]) + len(gen) < config.max_new_tokens:
                    if len(exits[b]) < o.max_trials:
                        probes.append((b, think[b] + gen[:k_trig], gen))
                    else:
                        think[b] += gen
                        nxt.append(b)
                elif k_end is not None:
                    think[b] += gen[:k_end]
                else:
                    think[b] += gen
            if probes:
                ctx = [pids[b] + before + trial_ids for b, before, _ in probes]
                tcfg = dataclasses.replace(config, max_new_tokens=o.trial_tokens,
                                           stop_strings=(o.trial_stop,), temperature=0.0)
                tout = model.generate(ctx, tcfg, [*interventions, *self.interventions])
                answers = [_strip_eos(model, g)[0] for g in tout.generated_ids]
                scored = [a[:k] if (k := _marker_index(model, a, o.trial_stop)) else a
                          for a in answers]
                confs = self._confidence(model, ctx, scored)
                for (b, before, gen), ans, conf in zip(probes, answers, confs, strict=True):
                    trial[b] += len(trial_ids) + len(ans)
                    exits[b].append({"at": len(before), "confidence": conf,
                                     "answer": model.decode(ans)})
                    if conf >= o.threshold:
                        think[b] = before
                    else:
                        think[b] += gen
                        nxt.append(b)
            todo = nxt
        end = [_end_ids(model, t, o.end_text) for t in think]
        ans = self._answer(model, [pids[b] + think[b] + end[b] for b in range(n)], config,
                           interventions, o.answer_tokens)
        gen = [think[b] + end[b] + ans.generated_ids[b] for b in range(n)]
        tokens = [TokenCount(len(think[b]), len(end[b]) + len(ans.generated_ids[b]), trial[b])
                  for b in range(n)]
        res = _finish(model, pids, gen, ans.finish_reasons, tokens, time.perf_counter() - t0)
        res.trials = exits  # type: ignore[attr-defined]
        return res


for _cls in (Deer, BudgetForcing):
    if _cls.name not in STEERING_METHODS:
        STEERING_METHODS.register(_cls.name, _cls)
