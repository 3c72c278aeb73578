"""nnsight 0.8 backend: a `TransformersModel` around the Hugging Face model.

The same traces run locally, dispatched over several devices (`device_map="auto"` or an
explicit map, via accelerate), or on NDIF (`remote=True`; `remote="local"` serialises every
trace exactly as for NDIF and runs it here). Module paths per architecture live in
`lens_steer.backends.nnsight_sites` and nowhere else.

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
- `fast_decode` (default True): local generation (`remote=False`, `remote_decode="cache"`) runs
  its decode steps on the Hugging Face model itself, the sites' edits applied by plain torch
  hooks (`hf_hooks`, same module paths and semantics as the trace body) instead of one nnsight
  trace per step. Remote and "local" NDIF modes, and captures, keep the traces.
  `LENS_STEER_FAST_DECODE=0` switches it off; `last_decode_path` says which ran.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lens_steer.backends.base import ModelBackend, TokenIds
from lens_steer.backends.hf_common import (
    KVState,
    capture_in_chunks,
    chunked_prefill,
    gather_pattern,
    load_tokenizer,
    position_ids,
)
from lens_steer.backends.hf_hooks import edit_points, fast_decode_enabled, register
from lens_steer.backends.nnsight_remote import (
    REMOTE_DECODE,
    History,
    RemoteSetupError,  # noqa: F401 - part of this backend's API
    check_remote,
    ndif_api_key,  # noqa: F401 - part of this backend's API
)
from lens_steer.backends.nnsight_sites import ARCHS as _ARCHS
from lens_steer.backends.nnsight_sites import arch_for, at, plan, trace_body
from lens_steer.interventions import Edit
from lens_steer.sites import Site, validate_site


class NNsightBackend(ModelBackend):
    name = "nnsight"

    def __init__(self, source: str, device: torch.device, dtype: torch.dtype,
                 device_map: str | dict | None = None, remote: bool | str = False,
                 remote_decode: str | None = None, prefill_chunk: int | None = None,
                 fast_decode: bool = True, **options: Any):
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
        self.fast_decode = fast_decode
        self.last_decode_path: str | None = None
        """'hf' (plain HF forward with torch hooks) or 'nnsight' (one trace a step)."""
        self._fast, self._session, self._steps = False, set(), {}
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
        self.n_heads = int(cfg.num_attention_heads)
        self.d_head = int(getattr(cfg, "head_dim", None) or self.d_model // self.n_heads)
        self.dtype = dtype
        self.model_type = str(cfg.model_type)

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

    @property
    def arch(self):
        """Module paths of this architecture (`nnsight_sites.ARCHS`); unknown ones raise."""
        return arch_for(self.model_type)

    def _layers(self):
        return at(self.model, self.arch.layers)

    # -- reading activations -----------------------------------------------------------------
    @torch.no_grad()
    def capture(self, sequences: Sequence[TokenIds], sites: Sequence[str | Site | int],
                positions: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        sites, input_ids, mask, rows, cols = self._capture_batch(sequences, sites, positions)
        width = input_ids.shape[1]
        edits = self.forward_edits(sequences, width)
        chunk = self.prefill_chunk
        if chunk and width > chunk and not self.remote:
            if any(s.kind == "pattern" for s in sites):
                raise NotImplementedError("attention patterns are not captured in chunks; load "
                                          "without prefill_chunk to capture attn.hook_pattern")
            return self._capture_chunked(input_ids, mask, sites, rows, cols, chunk, edits)
        saved = self._capture_span(input_ids, mask, sites, rows, cols, None, edits)
        out = {}
        for s in sites:
            if s.kind == "pattern":
                out[s.name] = gather_pattern(saved[s.name], rows, cols, [len(q) for q in sequences])
            else:
                out[s.name] = saved[s.name].detach().float().cpu()
        return out

    def _capture_span(self, input_ids, mask, sites, rows, cols, past, edits=()):
        """One trace over `input_ids` (cached prefix in `past`); only gathered rows are saved
        and the forward stops after the last site it needs."""
        todo = plan(list(edits), sites)
        root, arch, n_heads, saved = self.model, self.arch, self.n_heads, {}
        patterns = any(s.kind == "pattern" for s in sites)
        with self._attention("eager" if patterns else None), \
                self._trace(input_ids, attention_mask=mask,
                            position_ids=position_ids(mask, input_ids.shape[1]),
                            past_key_values=past, use_cache=past is not None) as tracer:
            trace_body(root, arch, todo, rows, cols, n_heads, saved)
            tracer.stop()
        return saved

    @contextmanager
    def _attention(self, implementation: str | None) -> Iterator[None]:
        """Temporarily switch the attention kernel (patterns need eager attention's weights)."""
        current = self._hf.config._attn_implementation
        if implementation is None or implementation == current:
            yield
            return
        self._hf.set_attn_implementation(implementation)
        try:
            yield
        finally:
            self._hf.set_attn_implementation(current)

    def _capture_chunked(self, input_ids, mask, sites, rows, cols, chunk, edits):
        """Capture a long batch `chunk` columns at a time through a KV cache that only ever
        holds the layers the sites need; rows leave each chunk's trace gathered."""
        from transformers import DynamicCache

        past = DynamicCache(config=self._hf.config)

        def span(start: int, end: int, r: Tensor, c: Tensor) -> dict[str, Tensor]:
            saved = self._capture_span(input_ids[:, start:end], mask[:, :end], sites, r, c,
                                       past, [e.columns(start, end) for e in edits])
            return {s.name: saved[s.name].detach().float().cpu() for s in sites}

        return capture_in_chunks(span, rows, cols, input_ids.shape[1], chunk,
                                 [s.name for s in sites])

    @torch.no_grad()
    def logits(self, sequences: Sequence[TokenIds]) -> list[Float[Tensor, "pos vocab"]]:
        input_ids, mask = self.pad_batch(sequences)
        lm_head, root, n_heads = self.model.lm_head, self.model, self.n_heads
        edits = self.forward_edits(sequences, input_ids.shape[1])
        todo = plan(edits, [])
        arch = self.arch if todo else None
        with self._trace(input_ids, attention_mask=mask,
                         position_ids=position_ids(mask, input_ids.shape[1])):
            if todo:
                trace_body(root, arch, todo, None, None, n_heads, {})
            out = lm_head.output.save()
        return [out[b, mask[b].bool().to(out.device)].float().cpu()
                for b in range(len(sequences))]

    # -- generation ----------------------------------------------------------------------------
    @contextmanager
    def decoding(self, sites: Sequence[Site]) -> Iterator[None]:
        """Locally, torch hooks at `sites` for the whole generation (see `fast_decode`)."""
        handles = None
        if fast_decode_enabled(self.fast_decode) and not self.remote \
                and self.remote_decode == "cache" and self.model_type in _ARCHS:
            handles = register(self._hf, self.arch,
                               edit_points(sites, lambda s: self._steps.get(s), self.n_heads))
        self._fast, self._session = handles is not None, set(sites)
        self.last_decode_path = "hf" if self._fast else "nnsight"
        try:
            yield
        finally:
            for h in handles or ():
                h.remove()
            self._fast, self._session, self._steps = False, set(), {}

    def forward_step(self, input_ids, attention_mask, past, edits):
        if self.remote_decode == "recompute":
            state = past if past is not None else History(input_ids[:, :0].cpu())
            state.extend(input_ids.cpu(), edits)
            ids = state.ids.to(self.device)
            logits, _ = self._step(ids, attention_mask, None, list(state.edits.values()),
                                   use_cache=False)
            return logits, state
        cache, chunk = None if past is None else past.cache, self.prefill_chunk
        if not chunk or input_ids.shape[1] <= chunk:
            logits, cache = self._step(input_ids, attention_mask, cache, edits, use_cache=True)
        else:
            logits, cache = chunked_prefill(
                lambda ids, mask, c, part: self._step(ids, mask, c, part, use_cache=True),
                input_ids, attention_mask, cache, edits, chunk)
        return logits, KVState(cache)

    @torch.no_grad()
    def _step(self, input_ids, attention_mask, past, edits, use_cache: bool):
        """One trace applying `edits`, last-position logits only (`logits_to_keep`); inside a
        fast `decoding`, a plain forward whose torch hooks apply them."""
        if self._fast and use_cache and all(e.site in self._session for e in edits):
            steps: dict[Site, list[Edit]] = {}
            for e in edits:
                steps.setdefault(e.site, []).append(e)
            self._steps = steps
            try:
                out = self._hf(input_ids, attention_mask=attention_mask, past_key_values=past,
                               position_ids=position_ids(attention_mask, input_ids.shape[1]),
                               use_cache=True, logits_to_keep=1)
            finally:
                self._steps = {}
            return out.logits[:, -1], out.past_key_values
        lm_head, model, root, n_heads = self.model.lm_head, self.model, self.model, self.n_heads
        todo = plan([e for e in edits if e.mask.any()], [])
        arch = self.arch if todo else None
        kwargs = dict(attention_mask=attention_mask, logits_to_keep=1,
                      position_ids=position_ids(attention_mask, input_ids.shape[1]),
                      use_cache=use_cache)
        if use_cache:
            kwargs["past_key_values"] = past
        with self._trace(input_ids, **kwargs):
            if todo:
                trace_body(root, arch, todo, None, None, n_heads, {})
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
        site = validate_site(layer, self.n_layers)
        if _is_functorch_wrapped(delta) and (self.remote or self._offloaded):
            where = (f"remote={self.remote!r}: NDIF traces ship plain tensors"
                     if self.remote else "accelerate offloads some weights to CPU/disk")
            raise NotImplementedError(
                f"forward-mode derivatives through this model are unavailable ({where}). "
                "Calibrate γ on a locally loaded copy (one GPU, or device_map over GPUs with "
                "no offload) and reuse the calibrated γ here")
        ids = torch.tensor([list(sequence)], device=self.device)
        last = torch.zeros(1, len(sequence), dtype=torch.bool, device=self.device)
        last[0, -1] = True
        edits = self.forward_edits([sequence], len(sequence))
        edits.append(Edit(site, last, "add", delta, 1.0, None, None, -1))
        todo = plan(edits, [])
        root, arch, n_heads, lm_head = self.model, self.arch, self.n_heads, self.model.lm_head
        with self._trace(ids, logits_to_keep=1):
            trace_body(root, arch, todo, None, None, n_heads, {})
            logits = lm_head.output[0, -1].save()
        return logits


    def forward_embeds(self, inputs_embeds, attention_mask, position_ids, past=None, sites=()):
        """One local trace from input embeddings, reading any `sites` (TransformerLens hook
        names) over the new positions. Saved values only: no gradient through the trace."""
        from transformers import DynamicCache

        from lens_steer.backends.base import EmbedsOutput

        if self.remote:
            raise NotImplementedError("forward_embeds runs locally only (remote=False): the "
                                      "KV cache of a latent loop cannot stay on NDIF")
        wanted = list(dict.fromkeys(self.validate_sites(sites))) if sites else []
        final = Site("ln_final")
        todo = plan([], [*wanted, final])
        past = past if past is not None else DynamicCache(config=self._hf.config)
        root, arch, n_heads, saved = self.model, self.arch, self.n_heads, {}
        every = slice(None)
        with self._attention("eager" if any(s.kind == "pattern" for s in wanted) else None), \
                self._trace(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            position_ids=position_ids, past_key_values=past, use_cache=True):
            trace_body(root, arch, todo, every, every, n_heads, saved)
        hidden = saved[final.name]
        names = {s.name for s in wanted}
        return EmbedsOutput(hidden, past, {k: v for k, v in saved.items() if k in names})


def _is_functorch_wrapped(t: Tensor) -> bool:
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except AttributeError:  # pragma: no cover - older torch
        return False


def _input_device(hf) -> torch.device:
    """Where inputs go under a device map: the embedding's device (CPU when offloaded)."""
    dev = hf.get_input_embeddings().weight.device
    return torch.device("cpu") if dev.type == "meta" else dev
