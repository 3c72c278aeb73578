"""TransformerLens 4.x backend: a `TransformerBridge` around the Hugging Face model.

Hook names (`blocks.{i}.hook_resid_post`) live here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lens_steer.backends.base import ModelBackend, TokenIds
from lens_steer.backends.compat import patch_bridge_kv_cache
from lens_steer.backends.hf_common import (
    KVState,
    combine_edits,
    gather_index,
    load_tokenizer,
    position_ids,
)


def resid_post(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


class TransformerLensBackend(ModelBackend):
    name = "transformer_lens"

    def __init__(self, source: str, device: torch.device, dtype: torch.dtype, **options: Any):
        from transformer_lens.model_bridge import TransformerBridge

        self.source = source
        self._session_layers: set[int] = set()
        self._step_adds: dict[int, Tensor] = {}
        self.tokenizer = load_tokenizer(source)
        self.bridge = TransformerBridge.boot_transformers(
            source, tokenizer=self.tokenizer, device=str(device), dtype=dtype, **options)
        self.bridge.eval()
        patch_bridge_kv_cache(self.bridge)  # transformers >= 5.24: see backends/compat.py
        self.n_layers = int(self.bridge.cfg.n_layers)
        self.d_model = int(self.bridge.cfg.d_model)
        self.device, self.dtype = device, dtype

    @property
    def hf_model(self):
        return self.bridge.original_model

    @torch.no_grad()
    def capture_resid(self, sequences: Sequence[TokenIds], layers: Sequence[int],
                      positions: Sequence[Sequence[int]]) -> dict[int, Float[Tensor, "n d_model"]]:
        layers = self.validate_layers(layers)
        input_ids, mask = self.pad_batch(sequences)
        rows, cols = gather_index([len(s) for s in sequences], input_ids.shape[1], positions)
        captured: dict[int, Tensor] = {}

        def keep(layer: int):
            def hook(x: Tensor, hook) -> None:
                captured[layer] = x[rows, cols].detach().float().cpu()
            return hook

        hooks = [(resid_post(layer), keep(layer)) for layer in layers]
        with self.bridge.hooks(fwd_hooks=hooks):
            self.bridge(input_ids, attention_mask=mask,
                        position_ids=position_ids(mask, input_ids.shape[1]),
                        stop_at_layer=max(layers) + 1)
        return {layer: captured[layer] for layer in layers}

    @torch.no_grad()
    def logits(self, sequences: Sequence[TokenIds]) -> list[Float[Tensor, "pos vocab"]]:
        input_ids, mask = self.pad_batch(sequences)
        out = self.bridge(input_ids, attention_mask=mask,
                          position_ids=position_ids(mask, input_ids.shape[1]))
        return [out[b, mask[b].bool()].float().cpu() for b in range(len(sequences))]

    @contextmanager
    def decoding(self, layers: Sequence[int]) -> Iterator[None]:
        """One adder hook per steered layer for a whole generation (adding and removing hooks
        every step costs about as much as the edit on small models). Each hook adds the
        current step's edit from `_step_adds` and is the identity otherwise."""
        hooks = [(resid_post(layer), _step_adder(self, layer)) for layer in sorted(set(layers))]
        self._session_layers = set(layers)
        try:
            with self.bridge.hooks(fwd_hooks=hooks):
                yield
        finally:
            self._session_layers, self._step_adds = set(), {}

    def forward_step(self, input_ids, attention_mask, past, edits):
        adds = combine_edits(edits)
        outside = {layer: a for layer, a in adds.items() if layer not in self._session_layers}
        hooks = [(resid_post(layer), _adder(a)) for layer, a in outside.items()]
        self._step_adds = {layer: a for layer, a in adds.items() if layer not in outside}
        try:
            with self.bridge.hooks(fwd_hooks=hooks) if hooks else nullcontext():
                logits, cache = self.bridge(
                    input_ids, return_type="logits_and_cache", attention_mask=attention_mask,
                    position_ids=position_ids(attention_mask, input_ids.shape[1]),
                    past_key_values=None if past is None else past.cache, use_cache=True)
        finally:
            self._step_adds = {}
        return logits[:, -1], KVState(cache)

    def last_logits_given_delta(self, sequence: TokenIds, layer: int,
                                delta: Float[Tensor, "d_model"]) -> Float[Tensor, "vocab"]:
        self.validate_layers([layer])
        ids = torch.tensor([list(sequence)], device=self.device)

        def add_last(x: Tensor, hook) -> Tensor:
            return torch.cat([x[:, :-1], x[:, -1:] + delta.to(x.dtype)], dim=1)

        with self.bridge.hooks(fwd_hooks=[(resid_post(layer), add_last)]):
            return self.bridge(ids)[0, -1]


def _step_adder(backend: TransformerLensBackend, layer: int):
    """Adds `backend._step_adds[layer]` when the current step edits `layer`, else identity."""
    def hook(x: Tensor, hook) -> Tensor:
        add = backend._step_adds.get(layer)
        return x if add is None else x + add.to(x.dtype)
    return hook


def _adder(add: Tensor):
    def hook(x: Tensor, hook) -> Tensor:
        return x + add.to(x.dtype)
    return hook
