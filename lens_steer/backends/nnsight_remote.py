"""NDIF execution for the nnsight backend: fail-fast setup checks (hub id, API key) and the
decode state that replaces a KV cache when it cannot stay on the executor
(`remote_decode="recompute"`: token ids plus each intervention's edit over every position)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from lens_steer.interventions import Edit

REMOTE_DECODE = ("recompute", "cache")


class RemoteSetupError(RuntimeError):
    """`remote=True` cannot run: no hub id or no NDIF API key."""


def ndif_api_key() -> str | None:
    """The NDIF key nnsight would send: `NDIF_API_KEY`, else nnsight's saved config."""
    key = os.environ.get("NDIF_API_KEY")
    if key:
        return key
    try:
        from nnsight import CONFIG

        return CONFIG.API.APIKEY or None
    except Exception:  # noqa: BLE001 - an unreadable config means "no key"
        return None


def check_remote(source: str | os.PathLike, remote: bool | str) -> None:
    """Fail fast, before any download, when NDIF execution cannot work."""
    if not remote or remote == "local":
        return
    src = str(source)
    if src == "toy" or Path(src).expanduser().exists() or src.count("/") != 1 \
            or src.startswith((".", "/", "~")):
        raise RemoteSetupError(
            f"remote=True runs on NDIF, which loads models by Hugging Face hub id, but {src!r} "
            "is not one (it is a local path or 'toy'). Pass the hub id, e.g. "
            "'Qwen/QwQ-32B', or use remote='local' to run the NDIF-serialised traces here")
    if not ndif_api_key():
        raise RemoteSetupError(
            "remote=True needs an NDIF API key: `export NDIF_API_KEY=...` (get one at "
            "https://login.ndif.us) or `nnsight.CONFIG.set_default_api_key(...)`; "
            "remote='local' needs none")


@dataclass
class History:
    """Decode state when the KV cache cannot stay on the executor (`remote_decode="recompute"`):
    every token id so far plus each intervention's edit over all those positions."""

    ids: Int[Tensor, "batch total"]
    edits: dict[int, Edit] = field(default_factory=dict)

    def extend(self, new_ids: Tensor, edits: Sequence[Edit]) -> None:
        width, old = new_ids.shape[1], self.ids.shape[1]
        self.ids = torch.cat([self.ids, new_ids], dim=1) if old else new_ids
        for key, e in self.edits.items():
            self.edits[key] = pad_columns(e, 0, width)
        for e in edits:
            if e.key not in self.edits:
                self.edits[e.key] = pad_columns(e, old, 0)
                continue
            h = self.edits[e.key]
            h.mask[:, old:] |= e.mask.to(h.mask.device)
            if e.op == "patch":
                h.value[:, old:] = torch.where(e.mask[..., None].to(h.value.device),
                                               e.value.to(h.value.device), h.value[:, old:])

    def select_rows(self, rows: Tensor) -> History:
        self.ids = self.ids[rows.cpu()]
        for key, e in self.edits.items():
            r = rows.to(e.mask.device)
            self.edits[key] = Edit(e.site, e.mask[r], e.op,
                                   e.value[r] if e.op == "patch" else e.value, e.scale, e.head,
                                   e.fn, e.key)
        return self


def pad_columns(e: Edit, before: int, after: int) -> Edit:
    """`e` with `before` / `after` unedited columns added (a patch's values padded with 0)."""
    def pad(t: Tensor, fill) -> Tensor:
        parts = [t.new_full((t.shape[0], before, *t.shape[2:]), fill), t,
                 t.new_full((t.shape[0], after, *t.shape[2:]), fill)]
        return torch.cat(parts, dim=1)
    value = pad(e.value, 0) if e.op == "patch" else e.value
    return Edit(e.site, pad(e.mask.bool(), False), e.op, value, e.scale, e.head, e.fn, e.key)
