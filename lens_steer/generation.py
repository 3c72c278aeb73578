"""Generation: how to decode (`GenerationConfig`), what came out (`GenerationResult`), and the
decode loop both backends share: KV cache, position rules, sampling, stopping.

A backend only supplies `forward_step` (one forward applying `Edit`s) and the decode state it
owns (`DecodeState.select_rows`); everything a researcher needs to trust about *where* an
activation was edited lives here, once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from lens_steer.errors import ConfigError
from lens_steer.interventions import (
    Intervention,
    SteeredSite,
    _Prepared,
    steered_site,
    validate_interventions,
)

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend

TokenIds = Sequence[int]


@dataclass
class GenerationConfig:
    """How to decode. `temperature == 0` is greedy."""

    max_new_tokens: int = 256
    """Upper bound on generated tokens per sequence."""
    temperature: float = 0.0
    """0 for greedy decoding; > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass (only when sampling)."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on tokens already in the sequence (1.0 = off)."""
    stop_strings: tuple[str, ...] = ()
    """Stop a sequence once its generated text contains one of these (kept in the output)."""
    stop_at_eos: bool = True
    """Stop a sequence at the tokenizer's EOS token."""
    logit_bias: dict[int, float] | None = None
    """Added to the next-token logits at every step (the logits-penalty baseline)."""
    batch_size: int = 32
    """Sequences decoded together (left-padded)."""
    seed: int | None = 0
    """Seed for sampling; None leaves the global RNG alone."""

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name} must be a number, got {value!r}") from None
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, value)
        if self.logit_bias and not all(math.isfinite(v) or v == -math.inf
                                       for v in self.logit_bias.values()):
            raise ConfigError("logit_bias values must be finite (or -inf to forbid a token)")
        if self.max_new_tokens < 0:
            raise ConfigError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise ConfigError("temperature must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ConfigError("repetition_penalty must be > 0 (1.0 = off)")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")


@dataclass
class GenerationResult:
    prompt_ids: list[list[int]]
    """Each prompt's token ids (no padding)."""
    generated_ids: list[list[int]]
    """Each sequence's generated token ids (no padding; EOS included if produced)."""
    texts: list[str]
    """Decoded generated text per sequence (special tokens kept except EOS/pad)."""
    finish_reasons: list[str]
    """'eos' | 'stop_string' | 'length' | 'position_limit' (the model's `max_positions` reached;
    see `ModelBackend.extrapolate`) per sequence."""
    steered: list[SteeredSite] = field(default_factory=list)
    """Every (sequence, position, layer) an intervention touched."""
    wall_time_s: float = 0.0

    @property
    def n_generated(self) -> list[int]:
        return [len(g) for g in self.generated_ids]


def generate(model: ModelBackend, prompts: Sequence[str] | Sequence[TokenIds],
             config: GenerationConfig, interventions: Sequence[Intervention] = (),
             progress: bool = False) -> GenerationResult:
    """Generate continuations of `prompts` (texts or token id lists), batched, left-padded."""
    if len(prompts) == 0:
        raise ValueError("no prompts given: pass at least one prompt")
    interventions = [*model.active_interventions, *interventions]
    validate_interventions(interventions, model.n_layers, model.d_model, model.n_heads,
                           model.d_head)
    prompt_ids = [model.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("empty prompt: every prompt needs at least one token")
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(config.seed)
    result = GenerationResult(prompt_ids=prompt_ids, generated_ids=[], texts=[], finish_reasons=[])
    start = time.perf_counter()
    batches = range(0, len(prompt_ids), config.batch_size)
    for offset in tqdm(batches, desc="generate", disable=not progress, unit="batch"):
        chunk = prompt_ids[offset:offset + config.batch_size]
        gen, reasons, sites = _generate_batch(model, chunk, config, interventions, generator,
                                              offset)
        result.generated_ids.extend(gen)
        result.finish_reasons.extend(reasons)
        result.steered.extend(sites)
    result.texts = [_decode_generated(model, g) for g in result.generated_ids]
    result.wall_time_s = time.perf_counter() - start
    return result


@torch.no_grad()
def _generate_batch(model: ModelBackend, prompts: list[list[int]], config: GenerationConfig,
                    interventions: Sequence[Intervention], generator: torch.Generator | None,
                    offset: int = 0) -> tuple[list[list[int]], list[str], list[SteeredSite]]:
    """Decode one batch. Finished sequences leave the batch (rows of the inputs and the KV
    cache are dropped), so a batch costs what its live sequences cost."""
    n = len(prompts)
    eos = model.tokenizer.eos_token_id if config.stop_at_eos else None
    sequences = [list(p) for p in prompts]
    generated: list[list[int]] = [[] for _ in range(n)]
    reasons = ["length"] * n
    sites: list[SteeredSite] = []
    prepared = [iv.prepare(model.device, model.dtype, key=i) for i, iv in enumerate(interventions)]

    with model.decoding(sorted({iv.site for iv in interventions}, key=lambda s: s.order)):
        _decode(model, config, prepared, generator, eos, sequences, generated, reasons, sites,
                offset)
    return generated, reasons, sites


def _decode(model: ModelBackend, config: GenerationConfig, prepared: Sequence[_Prepared],
            generator: torch.Generator | None, eos: int | None, sequences: list[list[int]],
            generated: list[list[int]], reasons: list[str], sites: list[SteeredSite],
            offset: int) -> None:
    """The step loop; fills `sequences`, `generated`, `reasons` and `sites` in place."""
    active = list(range(len(sequences)))  # batch row -> sequence index
    input_ids, attention_mask = model.pad_batch(sequences)
    n_new = [len(s) for s in sequences]
    past = None
    labels = [(p.iv.layer, p.iv.site.name, p.iv.op, p.iv.head) for p in prepared]
    limit = None if model.extrapolate else model.max_positions
    full_masks: dict[int, tuple[Tensor, Tensor]] = {}  # batch size -> all-set (batch, 1) masks
    for _step in range(config.max_new_tokens):
        width = input_ids.shape[1]
        live = [sequences[b] for b in active]
        edits = []
        if prepared:
            index, lengths = [b + offset for b in active], [len(s) for s in live]
        for p, (layer, name, op, head) in zip(prepared, labels, strict=True):
            if width == 1:  # decode steps: the rule answers in Python, no mask per step
                flags = p.iv.rule.newest(live, n_new)
                rows = [row for row, on in enumerate(flags) if on]
                if not rows:
                    continue
                sites.extend(steered_site(index[row], lengths[row] - 1, layer, name, op, head)
                             for row in rows)
                if len(rows) == len(flags):  # every row: one mask per batch size, reused
                    if len(rows) not in full_masks:
                        ones = torch.ones(len(rows), 1, dtype=torch.bool)
                        full_masks[len(rows)] = (ones, ones.to(model.device))
                    mask, on_device = full_masks[len(rows)]
                    edits.append(p.edit(mask, index, lengths, model.device, model.dtype,
                                        full=True, device_mask=on_device))
                else:
                    mask = torch.tensor(flags, dtype=torch.bool)[:, None]
                    edits.append(p.edit(mask, index, lengths, model.device, model.dtype))
                continue
            mask = p.iv.rule.mask(live, n_new, width)
            hits = mask.nonzero().tolist()
            if hits:
                sites.extend(steered_site(index[row], lengths[row] - (width - col), layer, name,
                                          op, head) for row, col in hits)
                edits.append(p.edit(mask, index, lengths, model.device, model.dtype,
                                    full=len(hits) == mask.numel()))
        logits, past = model.forward_step(input_ids, attention_mask, past, edits)
        next_ids = _choose(logits.float(), live, config, generator)
        keep = []
        for row, b in enumerate(active):
            tok = int(next_ids[row])
            sequences[b].append(tok)
            generated[b].append(tok)
            if eos is not None and tok == eos:
                reasons[b] = "eos"
            elif config.stop_strings and _hit_stop(model, generated[b], config.stop_strings):
                reasons[b] = "stop_string"
            elif limit is not None and len(sequences[b]) >= limit:
                reasons[b] = "position_limit"
            else:
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(active):
            rows = torch.tensor(keep, device=attention_mask.device)
            past = past.select_rows(rows)
            attention_mask, next_ids = attention_mask[rows], next_ids[keep]
            active = [active[r] for r in keep]
        input_ids = next_ids.to(attention_mask.device)[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)],
                                   dim=1)
        n_new = [1] * len(active)


def _choose(logits: Float[Tensor, "batch vocab"], sequences: list[list[int]],
            config: GenerationConfig, generator: torch.Generator | None) -> Int[Tensor, "batch"]:
    if config.logit_bias:
        ids = torch.tensor(list(config.logit_bias), device=logits.device)
        vals = torch.tensor(list(config.logit_bias.values()), device=logits.device)
        logits = logits.index_add(1, ids, vals.expand(logits.shape[0], -1))
    if config.repetition_penalty != 1.0:
        logits = logits.clone()
        for b, seq in enumerate(sequences):
            seen = torch.tensor(sorted(set(seq)), device=logits.device)
            vals = logits[b, seen]
            logits[b, seen] = torch.where(vals > 0, vals / config.repetition_penalty,
                                          vals * config.repetition_penalty)
    if config.temperature == 0:
        return logits.argmax(-1).cpu()
    probs = torch.softmax(logits / config.temperature, dim=-1).cpu()
    if config.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < config.top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _hit_stop(model: ModelBackend, generated: list[int], stops: tuple[str, ...]) -> bool:
    window = max(len(s) for s in stops) + 4  # tokens are >= 1 char, so this window suffices
    tail = model.tokenizer.decode(generated[-window:])
    return any(s in tail for s in stops)


def _decode_generated(model: ModelBackend, ids: list[int]) -> str:
    tok = model.tokenizer
    drop = {tok.eos_token_id, tok.pad_token_id}
    return tok.decode([i for i in ids if i not in drop])
