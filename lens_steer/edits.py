"""The tensor kernel of an intervention: one `Edit` (what one forward changes at one site) and
`apply_edit`, which both backends' hooks and nnsight's (remote) traces call. Plain torch only,
so nnsight can ship `apply_edit` into a trace; `lens_steer.interventions` builds the edits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool
from torch import Tensor

from lens_steer.sites import Site


@dataclass
class Edit:
    """One intervention's edit of one forward: what backends apply (see `apply_edit`)."""

    site: Site
    mask: Bool[Tensor, "batch width"]
    op: str
    value: Tensor | None
    """add: the delta; mean: the mean; project_out: the unit direction; patch: per-position
    source values (batch, width, ...); zero: a 0-d zero."""
    scale: float
    head: int | None
    fn: Callable | None
    key: int
    """Identity of the intervention (the nnsight recompute history keys edits by it)."""
    full: bool = False
    """Every entry of `mask` is set (e.g. `EveryPosition` at a decode step): `apply` skips the
    mask."""

    def columns(self, start: int, end: int) -> Edit:
        """The same edit restricted to columns [start, end) (chunked prefill)."""
        value = self.value[:, start:end] if self.op == "patch" else self.value
        return Edit(self.site, self.mask[:, start:end], self.op, value, self.scale, self.head,
                    self.fn, self.key, self.full)

    def apply(self, x: Tensor) -> Tensor:
        """`apply_edit(x, *self.args())`, in fewer torch ops when the mask is `full` (the same
        values: the masked formulas with every mask entry 1)."""
        if self.full and self.op not in ("patch", "hook"):
            return _apply_full(x, self.op, self.value, self.scale, self.head)
        return apply_edit(x, *self.args())

    def args(self) -> tuple:
        """Plain values for `apply_edit` (what travels into a remote trace)."""
        return (self.op, self.mask, self.value, self.scale, self.head, self.fn)


def apply_edit(x: Tensor, op: str, mask: Tensor, value: Tensor | None, scale: float,
               head: int | None, fn: Callable | None) -> Tensor:
    """`x` (batch, width, ...) with one operation applied where `mask` (batch, width) is set.
    Plain torch only: nnsight ships this function into its (remote) traces."""
    if head is not None and op == "hook":
        part = apply_edit(x[:, :, head], op, mask, value, scale, None, fn)
        return torch.cat([x[:, :, :head], part[:, :, None], x[:, :, head + 1:]], dim=2)
    if op == "add" and head is None:  # steering: the hot path of every decode step
        m = mask.to(x.device, x.dtype).reshape(*mask.shape, *([1] * (x.ndim - 2)))
        return torch.addcmul(x, m, value.to(x.device, x.dtype))
    m = mask.to(x.device).reshape(*mask.shape, *([1] * (x.ndim - 2)))
    if head is not None:  # x: (batch, width, heads, d_head); one masked op over all heads
        m = m & (torch.arange(x.shape[2], device=x.device) == head)[:, None]
        if op == "patch":
            value = value.unsqueeze(2)
    if op == "add":
        return torch.addcmul(x, m.to(x.dtype), value.to(x.device, x.dtype))
    if op == "scale":
        return torch.where(m, x * scale, x)
    if op == "project_out":
        u = value.to(x.device, x.dtype)
        return x - m.to(x.dtype) * (scale * (x * u).sum(-1, keepdim=True)) * u
    if op == "hook":
        return torch.where(m, fn(x), x)
    # zero, mean, patch: set the value
    return torch.where(m, value.to(x.device, x.dtype).expand_as(x), x)


_HEAD_MASKS: dict[tuple, tuple[Tensor, Tensor]] = {}


def _head_mask(n_heads: int, head: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(n_heads, 1) masks of `head`, bool and in x's dtype, made once per device and dtype."""
    key = (n_heads, head, x.device, x.dtype)
    masks = _HEAD_MASKS.get(key)
    if masks is None:
        m = (torch.arange(n_heads, device=x.device) == head)[:, None]
        masks = _HEAD_MASKS[key] = (m, m.to(x.dtype))
    return masks


def _apply_full(x: Tensor, op: str, value: Tensor | None, scale: float, head: int | None
                ) -> Tensor:
    """`apply_edit` with an all-set mask (not patch / hook): one or two torch ops."""
    if value is not None:
        value = value.to(x.device, x.dtype)
    if head is None:
        if op == "add":
            return x + value
        if op == "zero":
            return torch.zeros_like(x)
        if op == "mean":
            return value.expand_as(x).clone()
        if op == "scale":
            return x * scale
        # project_out (scale 1: the product with 1.0 changes nothing, so it is skipped)
        dot = (x * value).sum(-1, keepdim=True)
        return x - (dot if scale == 1.0 else scale * dot) * value
    hm, hm_x = _head_mask(x.shape[2], head, x)  # x: (batch, width, heads, d_head)
    if op == "add":
        return torch.addcmul(x, hm_x, value)
    if op == "zero":
        return x.masked_fill(hm, 0)
    if op == "mean":
        return torch.where(hm, value, x)
    if op == "scale":
        return torch.where(hm, x * scale, x)
    dot = (x * value).sum(-1, keepdim=True)
    return x - hm_x * (dot if scale == 1.0 else scale * dot) * value


def apply_edits(x: Tensor, edits: Sequence[tuple]) -> Tensor:
    """Apply `Edit.args()` tuples in order."""
    for args in edits:
        x = apply_edit(x, *args)
    return x
