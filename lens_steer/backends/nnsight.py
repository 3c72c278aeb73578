"""nnsight 0.8 backend: a `TransformersModel` around the Hugging Face model.

The same traces run locally, dispatched over several devices (`device_map="auto"` or an
explicit map, via accelerate), or on NDIF (`remote=True`; `remote="local"` serialises every
trace exactly as for NDIF and runs it here). Module paths (`model.layers[i]`) live here and
nowhere else.

Large-model options (all keyword arguments of `load_model(..., backend="nnsight")`):

- `device_map`: passed to `from_pretrained` (accelerate dispatch); inputs go to the device of
  the embedding, edits follow each block's output device.
- `remote`: False | True | "local" | "https://host" (see `nnsight`'s `trace(remote=...)`).
- `remote_decode`: "recompute" (default when remote) or "cache". NDIF cannot keep a KV cache
  between two requests, so "cache" ships the whole cache down and up again every step;
  "recompute" sends only token ids and the (mask, vector) edits and re-runs the full prefix
  each step: O(T^2) compute, O(T) bytes on the wire. Both give the local tokens.
- `prefill_chunk`: feed prompts longer than this many tokens in chunks through the KV cache
  (generation) and capture long traces chunk by chunk, stopping at the last captured layer.
  Peak activation memory then scales with the chunk, not the trace length.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_steer.backends.base import ModelBackend, TokenIds
from lens_steer.backends.hf_common import KVState, gather_index, load_tokenizer, position_ids

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
class _History:
    """Decode state when the KV cache cannot stay on the executor (`remote_decode="recompute"`):
    every token id so far plus, per intervention, its mask over those positions."""

    ids: Int[Tensor, "batch total"]
    masks: dict[tuple[int, int], Bool[Tensor, "batch total"]] = field(default_factory=dict)
    deltas: dict[tuple[int, int], Tensor] = field(default_factory=dict)

    def extend(self, new_ids: Tensor, edits) -> None:
        width = new_ids.shape[1]
        old = self.ids.shape[1]
        self.ids = torch.cat([self.ids, new_ids], dim=1) if old else new_ids
        pad = torch.zeros(self.ids.shape[0], width, dtype=torch.bool)
        for key in self.masks:
            self.masks[key] = torch.cat([self.masks[key], pad], dim=1)
        for layer, mask, delta in edits:
            key = (layer, id(delta))
            if key not in self.masks:
                self.masks[key] = torch.zeros(self.ids.shape[0], old + width, dtype=torch.bool)
                self.deltas[key] = delta
            self.masks[key][:, old:] |= mask.bool().cpu()

    def edits(self):
        return [(layer, self.masks[(layer, k)], self.deltas[(layer, k)])
                for layer, k in self.masks]

    def select_rows(self, rows: Tensor) -> _History:
        rows = rows.cpu()
        self.ids = self.ids[rows]
        self.masks = {key: m[rows] for key, m in self.masks.items()}
        return self


def _group_edits(edits) -> dict[int, list[tuple[Tensor, Tensor]]]:
    """Edits per layer as compact (bool mask, vector) pairs: what travels to the executor."""
    out: dict[int, list[tuple[Tensor, Tensor]]] = {}
    for layer, mask, delta in edits:
        out.setdefault(int(layer), []).append((mask.bool(), delta))
    return dict(sorted(out.items()))


class NNsightBackend(ModelBackend):
    name = "nnsight"

    def __init__(self, source: str, device: torch.device, dtype: torch.dtype,
                 device_map: str | dict | None = None, remote: bool | str = False,
                 remote_decode: str | None = None, prefill_chunk: int | None = None,
                 **options: Any):
        from nnsight.modeling.transformers import TransformersModel

        check_remote(source, remote)
        if remote_decode is None:
            remote_decode = "recompute" if remote else "cache"
        if remote_decode not in REMOTE_DECODE:
            raise ValueError(f"remote_decode={remote_decode!r}; use one of {REMOTE_DECODE}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError("prefill_chunk must be a positive number of tokens (or None)")
        self.source = source
        self.tokenizer = load_tokenizer(source)
        self.remote = remote
        self.remote_decode = remote_decode
        self.prefill_chunk = prefill_chunk
        self._remote_only = bool(remote) and remote != "local"
        if self._remote_only:
            # NDIF holds the weights: build the module tree on the meta device only.
            self.model = TransformersModel(source, tokenizer=self.tokenizer, dtype=dtype,
                                           **options)
            hf = self.model._module
            self.device = torch.device("cpu")
        else:
            from transformers import AutoModelForCausalLM

            if device_map is not None:
                hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype,
                                                          device_map=device_map, **options)
                self.device = _input_device(hf)
            else:
                hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **options)
                hf = hf.to(device)
                self.device = torch.device(device)
            hf.eval()
            self.model = TransformersModel(hf, tokenizer=self.tokenizer)
        self._hf = hf
        self._device_map = getattr(hf, "hf_device_map", None)
        self._offloaded = any(getattr(getattr(m, "_hf_hook", None), "offload", False)
                              for m in hf.modules())
        cfg = hf.config
        self.n_layers = int(cfg.num_hidden_layers)
        self.d_model = int(cfg.hidden_size)
        self.dtype = dtype

    @property
    def hf_model(self):
        return self._hf

    @property
    def device_map(self):
        return self._device_map

    def _trace(self, *args, **kwargs):
        if self.remote:
            kwargs["remote"] = self.remote
        return self.model.trace(*args, **kwargs)

    # -- reading activations -----------------------------------------------------------------
    @torch.no_grad()
    def capture_resid(self, sequences: Sequence[TokenIds], layers: Sequence[int],
                      positions: Sequence[Sequence[int]]) -> dict[int, Float[Tensor, "n d_model"]]:
        layers = self.validate_layers(layers)
        input_ids, mask = self.pad_batch(sequences)
        width = input_ids.shape[1]
        rows, cols = gather_index([len(s) for s in sequences], width, positions)
        chunk = self.prefill_chunk
        if chunk and width > chunk and not self.remote:
            return self._capture_chunked(input_ids, mask, layers, rows, cols, chunk)
        saved = self._capture_span(input_ids, mask, layers, rows, cols, past=None)
        return {layer: saved[layer].detach().float().cpu() for layer in layers}

    def _capture_span(self, input_ids, mask, layers, rows, cols, past):
        """One trace over `input_ids` (cached prefix in `past`); only gathered rows are saved
        and the forward stops after the last requested layer."""
        blocks = self.model.model.layers
        saved = {}
        with self._trace(input_ids, attention_mask=mask,
                         position_ids=position_ids(mask, input_ids.shape[1]),
                         past_key_values=past, use_cache=past is not None) as tracer:
            for layer in sorted(set(layers)):
                saved[layer] = blocks[layer].output[rows, cols].save()
            tracer.stop()
        return saved

    def _capture_chunked(self, input_ids, mask, layers, rows, cols, chunk):
        """Capture a long batch `chunk` columns at a time through a KV cache that only ever
        holds layers <= max(layers); rows leave each chunk's trace gathered."""
        from transformers import DynamicCache

        past = DynamicCache(config=self._hf.config)
        parts: dict[int, list[Tensor]] = {layer: [] for layer in layers}
        order = []
        width = input_ids.shape[1]
        for start in range(0, width, chunk):
            end = min(start + chunk, width)
            sel = ((cols >= start) & (cols < end)).nonzero()[:, 0]
            saved = self._capture_span(input_ids[:, start:end], mask[:, :end], layers,
                                       rows[sel], cols[sel] - start, past)
            order.append(sel)
            for layer in layers:
                parts[layer].append(saved[layer].detach().float().cpu())
        inverse = torch.cat(order).argsort()
        return {layer: torch.cat(parts[layer])[inverse] for layer in layers}

    @torch.no_grad()
    def logits(self, sequences: Sequence[TokenIds]) -> list[Float[Tensor, "pos vocab"]]:
        input_ids, mask = self.pad_batch(sequences)
        lm_head = self.model.lm_head
        with self._trace(input_ids, attention_mask=mask,
                         position_ids=position_ids(mask, input_ids.shape[1])):
            out = lm_head.output.save()
        return [out[b, mask[b].bool().to(out.device)].float().cpu()
                for b in range(len(sequences))]

    # -- generation ----------------------------------------------------------------------------
    def forward_step(self, input_ids, attention_mask, past, edits):
        if self.remote_decode == "recompute":
            state = past if past is not None else _History(input_ids[:, :0].cpu())
            state.extend(input_ids.cpu(), edits)
            ids = state.ids.to(self.device)
            logits, _ = self._step(ids, attention_mask, None, state.edits(), use_cache=False)
            return logits, state
        width = input_ids.shape[1]
        chunk = self.prefill_chunk
        if not chunk or width <= chunk:
            logits, cache = self._step(input_ids, attention_mask, None if past is None else past.cache,
                                       edits,
                                       use_cache=True)
            return logits, KVState(cache)
        past = past.cache if past is not None else None
        total = attention_mask.shape[1]
        logits = None
        for start in range(0, width, chunk):
            end = min(start + chunk, width)
            part = [(layer, m[:, start:end], d) for layer, m, d in edits]
            logits, past = self._step(input_ids[:, start:end],
                                      attention_mask[:, :total - width + end], past, part,
                                      use_cache=True)
        return logits, KVState(past)

    @torch.no_grad()
    def _step(self, input_ids, attention_mask, past, edits, use_cache: bool):
        """One trace: edits added to `resid_post`, last-position logits only (`logits_to_keep`)."""
        blocks, lm_head, model = self.model.model.layers, self.model.lm_head, self.model
        groups = _group_edits([(layer, m, d) for layer, m, d in edits if m.any()])
        kwargs = dict(attention_mask=attention_mask, logits_to_keep=1,
                      position_ids=position_ids(attention_mask, input_ids.shape[1]),
                      use_cache=use_cache)
        if use_cache:
            kwargs["past_key_values"] = past
        with self._trace(input_ids, **kwargs):
            for layer, pairs in groups.items():
                out = blocks[layer].output
                for mask, delta in pairs:
                    out = out + mask[..., None].to(out.device, out.dtype) * \
                        delta.to(out.device, out.dtype)
                blocks[layer].output = out
            logits = lm_head.output[:, -1].save()
            if use_cache:
                new_past = model.output.past_key_values.save()
        return logits, (new_past if use_cache else None)

    # -- differentiable access for strength calibration ----------------------------------------
    def last_logits_given_delta(self, sequence: TokenIds, layer: int,
                                delta: Float[Tensor, "d_model"]) -> Float[Tensor, "vocab"]:
        """Differentiable in `delta` (autograd and torch.func) locally and under a device map
        whose weights stay on devices. Forward-mode AD (γ calibration's `torch.func.jvp`) cannot
        run remotely (dual tensors do not serialise) nor through accelerate's weight offload."""
        self.validate_layers([layer])
        if _is_functorch_wrapped(delta) and (self.remote or self._offloaded):
            where = (f"remote={self.remote!r}: NDIF traces ship plain tensors"
                     if self.remote else "accelerate offloads some weights to CPU/disk")
            raise NotImplementedError(
                f"forward-mode derivatives through this model are unavailable ({where}). "
                "Calibrate γ on a locally loaded copy (one GPU, or device_map over GPUs with "
                "no offload) and reuse the calibrated γ here")
        ids = torch.tensor([list(sequence)], device=self.device)
        block, lm_head = self.model.model.layers[layer], self.model.lm_head
        with self._trace(ids, logits_to_keep=1):
            out = block.output
            block.output = torch.cat([out[:, :-1], out[:, -1:] + delta.to(out.device)], dim=1)
            logits = lm_head.output[0, -1].save()
        return logits


def _is_functorch_wrapped(t: Tensor) -> bool:
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except AttributeError:  # pragma: no cover - older torch
        return False


def _input_device(hf) -> torch.device:
    """Where inputs go under a device map: the embedding's device (CPU when offloaded)."""
    dev = hf.get_input_embeddings().weight.device
    return torch.device("cpu") if dev.type == "meta" else dev
