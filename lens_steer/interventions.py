"""What to do to an activation, where, and a record of what was edited.

An `Intervention` applies one operation at one site (`lens_steer.sites`: TransformerLens hook
names) at the positions chosen by its `PositionRule`. Operations:

- `add` (steering; the default): `x + scale * vector`. `Intervention(layer=L, vector=v)` adds
  at `blocks.L.hook_resid_post`, as before sites existed.
- `zero`: `0` (zero-ablation); `mean`: `vector` (mean-ablation, e.g. a mean from a cache).
- `project_out`: `x - scale * (x . u) u` with `u = vector / |vector|` (directional ablation).
- `scale`: `scale * x`.
- `patch`: the activation of a source run at the same position (`source`, captured with
  `model.capture`).
- `hook`: `fn(x)`, any function of the site's activation tensor (batch, pos, ...).

On `blocks.L.attn.hook_z` an operation acts on every head, or on `head` only (vectors are then
(d_head,) instead of (n_heads, d_head)). Rules are evaluated per forward step of generation
(prefill, then one step per new token, with the KV cache), so every position is edited at most
once; plain forwards (capture, logits) evaluate them as a prefill:

- `EveryPosition()`: all real (non-pad) positions of the prefill, then every new token.
- `NewestPosition()`: the last prompt token at prefill, then every new token (ASC).
- `WhenNewestToken(predicate)`: like `NewestPosition`, but only when `predicate(ids)` is true
  for the sequence so far (SEAL: the newest token is a thought delimiter inside `<think>`).
- `AtPositions(positions)`: exactly these real-token positions (patching one state).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from lens_steer.edits import Edit, apply_edit, apply_edits  # noqa: F401 - re-exported
from lens_steer.errors import ConfigError
from lens_steer.registry import POSITION_RULES
from lens_steer.sites import Site, parse_site, validate_site


class PositionRule:
    """Chooses the positions of one forward step that an intervention touches."""

    def mask(self, sequences: Sequence[Sequence[int]], n_new: Sequence[int], width: int
             ) -> Bool[Tensor, "batch width"]:
        """Mask over this step's `width` right-aligned input positions.

        `sequences[b]` is sequence b's real token ids so far (including this step's), `n_new[b]`
        how many of them this step feeds (the rest are in the KV cache).
        """
        raise NotImplementedError

    def newest(self, sequences: Sequence[Sequence[int]], n_new: Sequence[int]) -> list[bool]:
        """`mask(sequences, n_new, 1)` as a list (a decode step: one column). The built-in rules
        answer in plain Python, without building a tensor every step."""
        return [bool(on) for on in self.mask(sequences, n_new, 1).view(-1).tolist()]


@dataclass(frozen=True)
class EveryPosition(PositionRule):
    def mask(self, sequences, n_new, width):
        first = width - torch.tensor(n_new)  # n = 0 gives first = width: nothing steered
        return torch.arange(width)[None, :] >= first[:, None]

    def newest(self, sequences, n_new):
        return [n > 0 for n in n_new]

    def __str__(self) -> str:
        return "every"


@dataclass(frozen=True)
class NewestPosition(PositionRule):
    def mask(self, sequences, n_new, width):
        return _newest_only([n > 0 for n in n_new], width)

    def newest(self, sequences, n_new):
        return [n > 0 for n in n_new]

    def __str__(self) -> str:
        return "newest"


@dataclass(frozen=True)
class WhenNewestToken(PositionRule):
    predicate: Callable[[Sequence[int]], bool]
    name: str = "when-newest-token"

    def mask(self, sequences, n_new, width):
        return _newest_only([n > 0 and bool(self.predicate(seq))
                             for seq, n in zip(sequences, n_new, strict=True)], width)

    def newest(self, sequences, n_new):
        return [n > 0 and bool(self.predicate(seq))
                for seq, n in zip(sequences, n_new, strict=True)]

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class AtPositions(PositionRule):
    """Exactly the real-token `positions` (counted from 0), whenever a step feeds them."""

    positions: tuple[int, ...]

    def mask(self, sequences, n_new, width):
        lengths = torch.tensor([len(s) for s in sequences])
        # column c of this step holds real position len - (width - c)
        pos = lengths[:, None] - (width - torch.arange(width))[None, :]
        fed = torch.arange(width)[None, :] >= (width - torch.tensor(n_new))[:, None]
        return torch.isin(pos, torch.tensor(self.positions, dtype=torch.long)) & fed

    def newest(self, sequences, n_new):
        wanted = self._wanted
        return [n > 0 and len(s) - 1 in wanted for s, n in zip(sequences, n_new, strict=True)]

    @cached_property
    def _wanted(self) -> frozenset[int]:
        return frozenset(int(p) for p in self.positions)

    def __str__(self) -> str:
        return f"at{list(self.positions)}"


def _newest_only(flags: list[bool], width: int) -> Bool[Tensor, "batch width"]:
    if width == 1:  # every decode step: one op instead of three
        if all(flags):
            return torch.ones(len(flags), 1, dtype=torch.bool)
        return torch.tensor(flags, dtype=torch.bool)[:, None]
    m = torch.zeros(len(flags), width, dtype=torch.bool)
    m[:, -1] = torch.tensor(flags, dtype=torch.bool)
    return m


for _name, _rule in (("every", EveryPosition), ("newest", NewestPosition),
                     ("when-newest-token", WhenNewestToken), ("at", AtPositions)):
    POSITION_RULES.register(_name, _rule, overwrite=True)

OPS = ("add", "zero", "mean", "project_out", "scale", "patch", "hook")
_NEEDS_VECTOR = ("add", "mean", "project_out")


@dataclass
class Intervention:
    """Apply `op` at `site` (default: `resid_post` of block `layer`) under `rule`.

    `Intervention(layer, vector, rule, scale)` is steering by addition, as it always was; the
    class methods (`zero_ablate`, `mean_ablate`, `project_out`, `scaled`, `patch`, `hook`) build
    the other operations. See the module docstring for each operation's formula.
    """

    layer: int | None = None
    vector: Tensor | None = None
    rule: PositionRule = field(default_factory=NewestPosition)
    scale: float = 1.0
    site: str | Site | None = None
    """TransformerLens hook name; None means `blocks.{layer}.hook_resid_post`."""
    op: str = "add"
    head: int | None = None
    """On `attn.hook_z`: edit this head only (None: all heads)."""
    source: Tensor | Sequence[Tensor] | None = None
    """`patch`: source activations by real-token position, (pos, ...) for every sequence or
    one such tensor per sequence (in prompt order)."""
    fn: Callable[[Tensor], Tensor] | None = None
    """`hook`: a function of the site's activation (batch, pos, ...) returning the same shape."""

    def __post_init__(self) -> None:
        if self.site is None:
            if self.layer is None:
                raise ConfigError("Intervention needs a site (e.g. 'blocks.3.hook_resid_pre') "
                                  "or a layer (= its resid_post)")
            if not isinstance(self.layer, int) or isinstance(self.layer, bool):
                raise ConfigError(f"unknown layer {self.layer!r}: pass a block index (int)")
            self.site = Site("resid_post", self.layer)
        else:
            self.site = parse_site(self.site)
            if self.layer is not None and self.layer != self.site.layer:
                raise ConfigError(f"layer={self.layer} disagrees with site {self.site.name!r}; "
                                  "pass only the site")
            self.layer = self.site.layer
        if not self.site.editable:
            raise ConfigError(f"{self.site.name} can be captured but not edited")
        if self.op not in OPS:
            raise ConfigError(f"unknown operation {self.op!r}; choose one of {OPS}")
        try:
            self.scale = float(self.scale)
        except (TypeError, ValueError):
            raise ConfigError(f"scale must be a number, got {self.scale!r}") from None
        if not math.isfinite(self.scale):
            raise ConfigError(f"scale must be finite, got {self.scale!r}")
        if self.op in _NEEDS_VECTOR:
            if self.vector is None:
                raise ConfigError(f"operation {self.op!r} needs a vector")
            self.vector = torch.as_tensor(self.vector)
            if not torch.isfinite(self.vector).all():
                raise ConfigError(f"the {self.op} vector holds NaN/inf: check where it came from")
            if self.op == "project_out" and not self.vector.abs().sum() > 0:
                raise ConfigError("project_out needs a non-zero direction")
        if self.op == "patch":
            if self.source is None:
                raise ConfigError("operation 'patch' needs source activations (model.capture "
                                  "of the source run, by position)")
            for s in ([self.source] if isinstance(self.source, Tensor) else self.source):
                if not torch.isfinite(torch.as_tensor(s)).all():
                    raise ConfigError("patch source holds NaN/inf")
        if self.op == "hook" and not callable(self.fn):
            raise ConfigError("operation 'hook' needs fn, a function of the site's activation")
        if self.head is not None and self.site.kind != "z":
            raise ConfigError(f"head={self.head} needs a per-head site "
                              f"(blocks.{self.layer}.attn.hook_z), not {self.site.name}")

    # -- the operations ---------------------------------------------------------------------
    @classmethod
    def add(cls, site, vector, rule: PositionRule | None = None, scale: float = 1.0,
            head: int | None = None) -> Intervention:
        return cls(vector=vector, rule=rule or NewestPosition(), scale=scale, site=site,
                   head=head)

    @classmethod
    def zero_ablate(cls, site, rule: PositionRule | None = None, head: int | None = None
                    ) -> Intervention:
        return cls(site=site, op="zero", rule=rule or EveryPosition(), head=head)

    @classmethod
    def mean_ablate(cls, site, mean, rule: PositionRule | None = None, head: int | None = None
                    ) -> Intervention:
        return cls(site=site, op="mean", vector=mean, rule=rule or EveryPosition(), head=head)

    @classmethod
    def project_out(cls, site, direction, rule: PositionRule | None = None, scale: float = 1.0,
                    head: int | None = None) -> Intervention:
        return cls(site=site, op="project_out", vector=direction, rule=rule or EveryPosition(),
                   scale=scale, head=head)

    @classmethod
    def scaled(cls, site, factor: float, rule: PositionRule | None = None,
               head: int | None = None) -> Intervention:
        return cls(site=site, op="scale", scale=factor, rule=rule or EveryPosition(), head=head)

    @classmethod
    def patch(cls, site, source, rule: PositionRule | None = None, head: int | None = None
              ) -> Intervention:
        return cls(site=site, op="patch", source=source, rule=rule or EveryPosition(), head=head)

    @classmethod
    def hook(cls, site, fn: Callable[[Tensor], Tensor], rule: PositionRule | None = None
             ) -> Intervention:
        return cls(site=site, op="hook", fn=fn, rule=rule or EveryPosition())

    def delta(self) -> Float[Tensor, "d_model"]:
        """The added vector (`add` only)."""
        if self.op != "add":
            raise ConfigError(f"delta() is defined for 'add', not {self.op!r}")
        return self.scale * self.vector

    # -- one forward's edit ------------------------------------------------------------------
    def prepare(self, device: torch.device, dtype: torch.dtype, key: int = 0) -> _Prepared:
        """Tensors moved once per generation / forward (not per step); `key` (its index in the
        generation's list) identifies its edits across steps."""
        value = None
        if self.op == "add":
            value = (self.scale * self.vector.float()).to(device, dtype)
        elif self.op in ("mean", "project_out"):
            v = self.vector.float()
            value = (v if self.op == "mean" else v / v.norm()).to(device, dtype)
        elif self.op == "zero":
            value = torch.zeros((), device=device, dtype=dtype)
        source = None
        if self.op == "patch":
            source = (torch.as_tensor(self.source).to(device, dtype)
                      if isinstance(self.source, Tensor)
                      else [torch.as_tensor(t).to(device, dtype) for t in self.source])
        return _Prepared(self, value, source, key)


@dataclass
class _Prepared:
    iv: Intervention
    value: Tensor | None
    source: Tensor | list[Tensor] | None = None
    key: int = 0

    def edit(self, mask: Bool[Tensor, "batch width"], seq_index: Sequence[int],
             lengths: Sequence[int], device: torch.device, dtype: torch.dtype,
             full: bool = False, device_mask: Tensor | None = None) -> Edit:
        """The edit of one step: `mask` over its columns; row r is sequence `seq_index[r]` of
        real length `lengths[r]` (so column c is real position lengths[r] - width + c).
        `full`: the caller knows every entry of `mask` is set (`device_mask`: the same mask,
        already on `device`)."""
        iv, value = self.iv, self.value
        if iv.op == "patch":
            value = _patch_values(iv, self.source, mask, seq_index, lengths)
        return Edit(iv.site, mask.to(device) if device_mask is None else device_mask, iv.op,
                    value, float(iv.scale), iv.head, iv.fn, self.key, full)


def _patch_values(iv: Intervention, sources: Tensor | list[Tensor], mask: Tensor,
                  seq_index: Sequence[int], lengths: Sequence[int]) -> Tensor:
    """Dense (batch, width, ...) source values at the masked columns (zeros elsewhere)."""
    width = mask.shape[1]
    rows, cols = mask.nonzero(as_tuple=True)
    pos = torch.tensor(lengths)[rows] - width + cols
    if isinstance(sources, Tensor):
        limit = torch.full_like(pos, len(sources))
    else:
        limit = torch.tensor([len(sources[seq_index[r]]) for r in rows.tolist()], dtype=torch.long)
    if len(pos) and bool((pos >= limit).any()):
        i = int((pos >= limit).nonzero()[0, 0])
        raise ConfigError(f"patch at {iv.site.name}: sequence {seq_index[int(rows[i])]} reaches "
                          f"position {int(pos[i])} but the source has {int(limit[i])} positions; "
                          "restrict the rule (e.g. AtPositions) to positions the source run has")
    if isinstance(sources, Tensor):
        picked = sources[pos.to(sources.device)]
        shape, ref = sources.shape[1:], sources
    else:
        picked = torch.stack([sources[seq_index[r]][p]
                              for r, p in zip(rows.tolist(), pos.tolist(), strict=True)])
        shape, ref = sources[0].shape[1:], sources[0]
    out = ref.new_zeros(*mask.shape, *shape)
    out[rows.to(ref.device), cols.to(ref.device)] = picked
    return out


@dataclass(frozen=True)
class SteeredSite:
    """One edited (sequence, position, layer); position counts real tokens from 0. `site` and
    `op` say which hook point and operation (`site` defaults to resid_post of `layer`)."""

    sequence: int
    position: int
    layer: int | None
    site: str = ""
    op: str = "add"
    head: int | None = None

    def __post_init__(self) -> None:
        if not self.site and self.layer is not None:
            object.__setattr__(self, "site", Site("resid_post", self.layer).name)


_SITE_FIELDS = ("sequence", "position", "layer", "site", "op", "head")
assert tuple(f.name for f in fields(SteeredSite)) == _SITE_FIELDS


def steered_site(sequence: int, position: int, layer: int | None, site: str, op: str,
                 head: int | None) -> SteeredSite:
    """`SteeredSite(sequence, position, layer, site, op, head)` for a non-empty `site` (nothing
    to default), in half the time: generation records one per edited position and step."""
    record = object.__new__(SteeredSite)
    object.__setattr__(record, "__dict__", {"sequence": sequence, "position": position,
                                            "layer": layer, "site": site, "op": op,
                                            "head": head})
    return record


def validate_interventions(interventions: Sequence[Intervention], n_layers: int,
                           d_model: int, n_heads: int | None = None,
                           d_head: int | None = None) -> None:
    """Refuse unknown sites/layers/heads and vectors of the wrong size, loudly."""
    for iv in interventions:
        if iv.site.layer is not None and not 0 <= iv.site.layer < n_layers:
            raise ConfigError(
                f"unknown layer {iv.site.layer!r}: this model has layers 0..{n_layers - 1}")
        validate_site(iv.site, n_layers)
        if iv.head is not None and n_heads is not None and not 0 <= iv.head < n_heads:
            raise ConfigError(f"unknown head {iv.head}: this model has heads 0..{n_heads - 1}")
        if iv.op not in _NEEDS_VECTOR:
            continue
        if iv.site.kind == "z" and n_heads is not None:
            want: tuple[int, ...] = (d_head,) if iv.head is not None else (n_heads, d_head)
        else:
            want = (d_model,)
        if tuple(iv.vector.shape) != want:
            raise ConfigError(
                f"{iv.op} vector has shape {tuple(iv.vector.shape)} but {iv.site.name} needs "
                f"{want} (d_model is {d_model}): extract the vector from this model (or one with "
                "the same d_model)")

