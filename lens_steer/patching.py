"""Activation patching of the delimiter state between thought types.

Every thought opens at a `\\n\\n` delimiter token (`lens_steer.thoughts`); the state there
decides what kind of thought comes next. From the model's own traces we take delimiter
positions whose next thought is a reflection and ones whose next thought is an execution step,
copy the state at one site (e.g. `blocks.L.hook_resid_post`) from a reflection-opening
delimiter into an execution context at its delimiter position, and measure how the probability
that the next thought is a reflection moves; and the reverse.

"The probability that the next thought is a reflection" is measured, not judged: it is the
probability mass of the k-token openings that, in these traces, only ever begin a reflection
(`Openings`; k is the smallest length at which such openings cover most reflections; one token,
"Wait", for R1-style models). It is computed from the logits at the delimiter and at the
k-1 teacher-forced tokens after it (`model.logits`; the memory of one batch is batch x
length x vocabulary, so keep `batch_size` small on real models).

    states = delimiter_states(model, traces_ids)
    op = find_openings(traces_ids, states, "reflection")
    curve = patch_curve(model, traces_ids, states, op, layers=range(model.n_layers))
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from lens_steer.errors import DataError
from lens_steer.interventions import Intervention, PositionRule
from lens_steer.sites import Site
from lens_steer.thoughts import label_thought, segment_thoughts

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend


@dataclass(frozen=True)
class RowPositions(PositionRule):
    """Position `positions[b]` of row b, in plain forwards only (generation drops finished
    rows, so rows do not stay aligned with this tuple there)."""

    positions: tuple[int, ...]

    def mask(self, sequences, n_new, width) -> Bool[Tensor, "batch width"]:
        if len(sequences) != len(self.positions):
            raise ValueError(f"RowPositions holds {len(self.positions)} positions for "
                             f"{len(sequences)} rows; build it for this batch")
        m = torch.zeros(len(sequences), width, dtype=torch.bool)
        for b, (seq, n, p) in enumerate(zip(sequences, n_new, self.positions, strict=True)):
            col = width - len(seq) + p
            if len(seq) - n <= p < len(seq):  # fed by this forward
                m[b, col] = True
        return m

    def __str__(self) -> str:
        return "row-positions"


@dataclass(frozen=True)
class DelimiterState:
    """A delimiter in trace `trace` at token `position`, opening a thought labelled `label`."""

    trace: int
    position: int
    label: str
    n_tokens: int
    """Length of the thought it opens."""


def delimiter_states(model: ModelBackend, traces: Sequence[Sequence[int]], labeler=label_thought
                     ) -> list[DelimiterState]:
    """The delimiters of every trace (token ids: prompt + generation), with the label of the
    thought each opens."""
    return [DelimiterState(i, t.position, t.label, t.n_tokens)
            for i, ids in enumerate(traces)
            for t in segment_thoughts(ids, model, labeler=labeler)]


@dataclass(frozen=True)
class Openings:
    """The k-token openings that begin only `label` thoughts in the traces they came from."""

    label: str
    k: int
    prefixes: tuple[tuple[int, ...], ...]
    coverage: float
    """Share of `label` thoughts that start with one of `prefixes`."""
    texts: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prefixes": [list(p) for p in self.prefixes]}


def find_openings(traces: Sequence[Sequence[int]], states: Sequence[DelimiterState],
                  label: str = "reflection", max_k: int = 4, min_coverage: float = 0.9,
                  decode=None) -> Openings:
    """The smallest k whose label-pure k-token openings cover `min_coverage` of the `label`
    thoughts (else the k with the best coverage)."""
    target = [s for s in states if s.label == label]
    if not target:
        raise DataError(f"no {label} thought in these traces: patching needs traces with "
                        f"{label} thoughts (more traces, or another model)")
    best: Openings | None = None
    for k in range(1, max_k + 1):
        def opening(s: DelimiterState, k: int = k) -> tuple[int, ...]:
            return tuple(int(t) for t in traces[s.trace][s.position + 1:s.position + 1 + k])

        other = {opening(s) for s in states if s.label != label}
        mine = [opening(s) for s in target]
        pure = sorted({o for o in mine if o not in other and len(o) == k})
        cov = sum(o in set(pure) for o in mine) / len(mine)
        cand = Openings(label, k, tuple(pure), cov,
                        tuple(decode(list(p)) for p in pure) if decode else ())
        if best is None or cov > best.coverage:
            best = cand
        if cov >= min_coverage:
            return cand
    if not best.prefixes:
        raise DataError(f"every opening of a {label} thought (up to {max_k} tokens) also "
                        "opens another kind of thought: raise max_k")
    return best


def opening_probability(model: ModelBackend, contexts: Sequence[Sequence[int]], openings: Openings,
                        patch: tuple[str, Tensor] | None = None, batch_size: int = 32
                        ) -> Float[Tensor, "n"]:
    """P(the next tokens after each context spell one of `openings`), each context ending at
    its delimiter. `patch` = (site, states (n, ...)): the site's value at each context's last
    position is replaced by states[i] in every forward."""
    k = openings.k
    rows = [(i, list(ctx) + list(q[:-1]), len(ctx) - 1, q)
            for i, ctx in enumerate(contexts) for q in openings.prefixes]
    out = torch.zeros(len(contexts), dtype=torch.float64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        seqs = [r[1] for r in chunk]
        ivs = []
        if patch is not None:
            psite, states = patch
            sources = []
            for i, seq, p, _ in chunk:
                src = states.new_zeros(len(seq), *states.shape[1:])
                src[p] = states[i]
                sources.append(src)
            ivs.append(Intervention.patch(psite, sources,
                                          rule=RowPositions(tuple(r[2] for r in chunk))))
        with model.intervening(ivs), torch.no_grad():
            logp = torch.stack([torch.log_softmax(lg[p:p + k].double(), -1).cpu()
                                for lg, (_, _, p, _) in zip(model.logits(seqs), chunk,
                                                            strict=True)])
        targets = torch.tensor([list(q) for *_, q in chunk])
        lp = logp.gather(2, targets[:, :, None])[:, :, 0].sum(1)
        for (i, *_), v in zip(chunk, lp.exp(), strict=True):
            out[i] += v
    return out.float()


def pick_pairs(states: Sequence[DelimiterState], source: str, target: str, n: int,
               seed: int = 0) -> list[tuple[DelimiterState, DelimiterState]]:
    """Up to `n` (source, target) pairs, from different traces where possible, each state used
    about equally often."""
    src = [s for s in states if s.label == source]
    tgt = [s for s in states if s.label == target]
    if not src or not tgt:
        missing = source if not src else target
        raise DataError(f"no delimiter opens a {missing} thought in these traces: use more "
                        "traces")
    rng = random.Random(seed)
    rng.shuffle(src)
    rng.shuffle(tgt)
    pairs = []
    for j in range(min(n, max(len(src), len(tgt)))):
        t = tgt[j % len(tgt)]
        others = [s for s in src if s.trace != t.trace] or src
        pairs.append((others[j % len(others)], t))
    return pairs


def patch_curve(model: ModelBackend, traces: Sequence[Sequence[int]], states: Sequence[DelimiterState],
                openings: Openings, layers: Sequence[int], kind: str = "resid_post",
                n_pairs: int = 24, seed: int = 0, source: str = "reflection",
                target: str = "execution", batch_size: int = 32) -> list[dict[str, Any]]:
    """Per layer: P(next thought opens like `openings`) in `target` contexts, clean and with the
    `source` delimiter's state patched in at site `blocks.L.<kind>`; `effect` = (patched -
    clean target) / (clean source - clean target), averaged over pairs as a ratio of means
    (1 = the patch carries the whole difference)."""
    pairs = pick_pairs(states, source, target, n_pairs, seed)

    def ctx(s: DelimiterState) -> list[int]:
        return list(traces[s.trace][:s.position + 1])

    src_ctx, tgt_ctx = [ctx(s) for s, _ in pairs], [ctx(t) for _, t in pairs]
    p_src = opening_probability(model, src_ctx, openings, batch_size=batch_size)
    p_tgt = opening_probability(model, tgt_ctx, openings, batch_size=batch_size)
    sites = [Site(kind, layer).name for layer in layers]
    captured: dict[str, list[Tensor]] = {s: [] for s in sites}
    for i in range(0, len(src_ctx), batch_size):
        part = src_ctx[i:i + batch_size]
        got = model.capture(part, sites, [[len(c) - 1] for c in part])
        for s in sites:
            captured[s].append(got[s])
    gap = float((p_src - p_tgt).mean())
    rows = []
    for layer, site in zip(layers, sites, strict=True):
        p = opening_probability(model, tgt_ctx, openings, batch_size=batch_size,
                                patch=(site, torch.cat(captured[site])))
        rows.append({"layer": int(layer), "site": site, "n_pairs": len(pairs),
                     "p_target_clean": float(p_tgt.mean()), "p_source_clean": float(p_src.mean()),
                     "p_patched": float(p.mean()), "delta": float((p - p_tgt).mean()),
                     "delta_sem": float((p - p_tgt).std() / max(1, len(p)) ** 0.5)
                     if len(p) > 1 else 0.0,
                     "effect": float((p - p_tgt).mean()) / gap if abs(gap) > 1e-9 else None})
    return rows
