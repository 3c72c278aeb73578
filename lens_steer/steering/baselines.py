"""Logits-penalty baseline (SEAL's comparison): push down tokens that start reflections and
transitions, with no activation steering at all.

    bias = trigger_logit_bias(model.tokenizer)        # {token_id: -3.0, ...}
    model.generate(prompts, GenerationConfig(logit_bias=bias))

A token is penalised when its decoded text (stripped, lower-cased) contains a trigger word, or
when it is the first piece of a trigger word's own tokenisation (" Wait", "Wait", " wait",
"wait"; byte-level BPE vocabularies may split "Alternatively" into several pieces, and its first
piece decides whether the word gets written) and that piece covers at least half of the word
(short pieces such as "Al" also start "Alright").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_TRIGGERS: tuple[str, ...] = ("wait", "alternatively")


@dataclass
class PenaltyConfig:
    """Which tokens the logits penalty hits and by how much."""

    triggers: tuple[str, ...] = DEFAULT_TRIGGERS
    """Trigger words (case-insensitive) of reflection/transition thoughts."""
    penalty: float = -3.0
    """Added to the logit of every matching token at every step."""
    first_pieces: bool = True
    """Also penalise the first token of each trigger's tokenisation (for split words)."""
    min_piece_fraction: float = 0.5
    """A first piece must cover at least this share of the word's letters: shorter ones (e.g.
    "Al" of "Alternatively") also start unrelated words ("Alright") and are not penalised."""

    def __post_init__(self) -> None:
        self.triggers = tuple(t.strip().lower() for t in self.triggers)
        if not self.triggers or any(not t for t in self.triggers):
            raise ValueError("triggers must be non-empty words, e.g. ('wait', 'alternatively')")
        if self.penalty > 0:
            raise ValueError(f"penalty {self.penalty} > 0 would promote the triggers; use a "
                             "negative value such as -3")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tok(tokenizer: Any) -> Any:
    inner = getattr(tokenizer, "tokenizer", None)
    return inner if inner is not None and hasattr(inner, "decode") else tokenizer


def trigger_token_ids(tokenizer: Any, config: PenaltyConfig | None = None) -> list[int]:
    """Ids of every token the penalty applies to (sorted)."""
    config = config or PenaltyConfig()
    tok = _tok(tokenizer)
    n = len(tok)
    texts = tok.batch_decode([[i] for i in range(n)])
    special = set(getattr(tok, "all_special_ids", []) or [])
    ids = {i for i, t in enumerate(texts)
           if i not in special and any(w in t.strip().lower() for w in config.triggers)}
    if config.first_pieces:
        for word in config.triggers:
            for form in _forms(word):
                pieces = tok(form, add_special_tokens=False)["input_ids"]
                piece = texts[pieces[0]].strip() if pieces else ""
                if piece and len(piece) >= config.min_piece_fraction * len(word):
                    ids.add(int(pieces[0]))
    return sorted(ids)


def _forms(word: str) -> Sequence[str]:
    cap = word[:1].upper() + word[1:]
    return (word, cap, " " + word, " " + cap)


def trigger_logit_bias(tokenizer: Any, config: PenaltyConfig | None = None) -> dict[int, float]:
    """`{token_id: penalty}` for `GenerationConfig(logit_bias=...)`."""
    config = config or PenaltyConfig()
    ids = trigger_token_ids(tokenizer, config)
    if not ids:
        raise ValueError(f"no token of this vocabulary matches the triggers {config.triggers}: "
                         "the penalty would do nothing; pass other trigger words")
    return {i: float(config.penalty) for i in ids}
