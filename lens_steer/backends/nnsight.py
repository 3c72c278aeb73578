"""nnsight 0.8 backend: a `TransformersModel` around the Hugging Face model.

The same traces run locally, dispatched over several devices (`device_map`), or remotely on
NDIF (`remote=True`); module paths (`model.layers[i]`) live here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lens_steer.backends.base import ModelBackend, TokenIds
from lens_steer.backends.hf_common import (
    combine_edits,
    gather_index,
    load_tokenizer,
    position_ids,
)


class NNsightBackend(ModelBackend):
    name = "nnsight"

    def __init__(self, source: str, device: torch.device, dtype: torch.dtype,
                 device_map: str | dict | None = None, remote: bool | str = False,
                 **options: Any):
        from nnsight.modeling.transformers import TransformersModel
        from transformers import AutoModelForCausalLM

        self.source = source
        self.tokenizer = load_tokenizer(source)
        self.remote = remote
        if device_map is not None:
            hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map,
                                                      **options)
        else:
            hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **options).to(device)
        hf.eval()
        self._hf = hf
        self.model = TransformersModel(hf, tokenizer=self.tokenizer)
        cfg = hf.config
        self.n_layers = int(cfg.num_hidden_layers)
        self.d_model = int(cfg.hidden_size)
        self.device, self.dtype = torch.device(device), dtype

    @property
    def hf_model(self):
        return self._hf

    def _layers(self):
        return self.model.model.layers

    def _trace(self, *args, **kwargs):
        if self.remote:
            kwargs["remote"] = self.remote
        return self.model.trace(*args, **kwargs)

    @torch.no_grad()
    def capture_resid(self, sequences: Sequence[TokenIds], layers: Sequence[int],
                      positions: Sequence[Sequence[int]]) -> dict[int, Float[Tensor, "n d_model"]]:
        layers = self.validate_layers(layers)
        input_ids, mask = self.pad_batch(sequences)
        rows, cols = gather_index([len(s) for s in sequences], input_ids.shape[1], positions)
        saved = {}
        with self._trace(input_ids, attention_mask=mask,
                         position_ids=position_ids(mask, input_ids.shape[1])) as tracer:
            for layer in sorted(layers):
                saved[layer] = self._layers()[layer].output[rows, cols].save()
            tracer.stop()
        return {layer: saved[layer].detach().float().cpu() for layer in layers}

    @torch.no_grad()
    def logits(self, sequences: Sequence[TokenIds]) -> list[Float[Tensor, "pos vocab"]]:
        input_ids, mask = self.pad_batch(sequences)
        with self._trace(input_ids, attention_mask=mask,
                         position_ids=position_ids(mask, input_ids.shape[1])):
            out = self.model.lm_head.output.save()
        return [out[b, mask[b].bool()].float().cpu() for b in range(len(sequences))]

    def forward_step(self, input_ids, attention_mask, past, edits):
        adds = combine_edits(edits)
        with self._trace(input_ids, attention_mask=attention_mask,
                         position_ids=position_ids(attention_mask, input_ids.shape[1]),
                         past_key_values=past, use_cache=True):
            for layer in sorted(adds):
                block = self._layers()[layer]
                block.output = block.output + adds[layer]
            logits = self.model.lm_head.output[:, -1].save()
            new_past = self.model.output.past_key_values.save()
        return logits, new_past

    def last_logits_given_delta(self, sequence: TokenIds, layer: int,
                                delta: Float[Tensor, "d_model"]) -> Float[Tensor, "vocab"]:
        self.validate_layers([layer])
        ids = torch.tensor([list(sequence)], device=self.device)
        with self._trace(ids):
            block = self._layers()[layer]
            out = block.output
            block.output = torch.cat([out[:, :-1], out[:, -1:] + delta], dim=1)
            logits = self.model.lm_head.output[0, -1].save()
        return logits
