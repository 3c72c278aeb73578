"""What to add to the residual stream, where, and a record of what was steered.

An `Intervention` adds `scale * vector` to the residual stream after block `layer`
(`resid_post`) at the positions chosen by its `PositionRule`. Rules are evaluated per forward
step of generation (prefill, then one step per new token, with the KV cache), so every
position is steered at most once:

- `EveryPosition()`: all real (non-pad) positions of the prefill, then every new token.
- `NewestPosition()`: the last prompt token at prefill, then every new token (ASC).
- `WhenNewestToken(predicate)`: like `NewestPosition`, but only when `predicate(ids)` is true
  for the sequence so far (SEAL: the newest token is a thought delimiter inside `<think>`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float
from torch import Tensor


class PositionRule:
    """Chooses the positions of one forward step that an intervention touches."""

    def mask(self, sequences: Sequence[Sequence[int]], n_new: Sequence[int], width: int
             ) -> Bool[Tensor, "batch width"]:
        """Mask over this step's `width` right-aligned input positions.

        `sequences[b]` is sequence b's real token ids so far (including this step's), `n_new[b]`
        how many of them this step feeds (the rest are in the KV cache).
        """
        raise NotImplementedError


@dataclass(frozen=True)
class EveryPosition(PositionRule):
    def mask(self, sequences, n_new, width):
        first = width - torch.tensor(n_new)  # n = 0 gives first = width: nothing steered
        return torch.arange(width)[None, :] >= first[:, None]

    def __str__(self) -> str:
        return "every"


@dataclass(frozen=True)
class NewestPosition(PositionRule):
    def mask(self, sequences, n_new, width):
        return _newest_only([n > 0 for n in n_new], width)

    def __str__(self) -> str:
        return "newest"


@dataclass(frozen=True)
class WhenNewestToken(PositionRule):
    predicate: Callable[[Sequence[int]], bool]
    name: str = "when-newest-token"

    def mask(self, sequences, n_new, width):
        return _newest_only([n > 0 and bool(self.predicate(seq))
                             for seq, n in zip(sequences, n_new, strict=True)], width)

    def __str__(self) -> str:
        return self.name


def _newest_only(flags: list[bool], width: int) -> Bool[Tensor, "batch width"]:
    m = torch.zeros(len(flags), width, dtype=torch.bool)
    m[:, -1] = torch.tensor(flags, dtype=torch.bool)
    return m


POSITION_RULES = {"every": EveryPosition, "newest": NewestPosition}


@dataclass
class Intervention:
    """Add `scale * vector` to `resid_post` of block `layer` at the positions of `rule`."""

    layer: int
    vector: Float[Tensor, "d_model"]
    rule: PositionRule = field(default_factory=NewestPosition)
    scale: float = 1.0

    def delta(self) -> Float[Tensor, "d_model"]:
        return self.scale * self.vector


@dataclass(frozen=True)
class SteeredSite:
    """One steered (sequence, position, layer); position counts real tokens from 0."""

    sequence: int
    position: int
    layer: int


def validate_interventions(interventions: Sequence[Intervention], n_layers: int,
                           d_model: int) -> None:
    """Refuse unknown layers and vectors of the wrong size, loudly."""
    for iv in interventions:
        if not isinstance(iv.layer, int) or not 0 <= iv.layer < n_layers:
            raise ValueError(
                f"unknown layer {iv.layer!r}: this model has layers 0..{n_layers - 1}")
        if iv.vector.ndim != 1 or iv.vector.shape[0] != d_model:
            raise ValueError(
                f"steering vector has shape {tuple(iv.vector.shape)} but the model's d_model is "
                f"{d_model}: extract the vector from this model (or one with the same d_model)")
