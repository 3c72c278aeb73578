"""TransformerLens 4.x backend: a `TransformerBridge` around the Hugging Face model.

Sites are the bridge's own hook points (`blocks.{i}.hook_resid_post`, ...; see
`lens_steer.sites`), with one exception: the bridge's `hook_resid_mid` reads the residual after
attention but an edit there only reaches the MLP's norm, not the residual. So `resid_mid` edits
go through `hook_attn_out` (new attn_out = f(resid_pre + attn_out) - resid_pre), which edits the
residual itself, as on the nnsight backend. And `ln_final.hook_normalized` is served by the
bridge's `ln_final.hook_out` (after the norm's weight, what the unembedding reads); the bridge's
own `ln_final.hook_normalized` is before the weight (see `lens_steer.sites`).

Decode steps (`forward_step` inside `decoding`) and `logits` run on a plain HF model sharing the
bridge's weights (`hf_hooks.shared_model`, built once, no copy), our edits applied by torch
hooks at the same points, whenever every hook a user attached to the bridge sits at a point a
torch hook reaches with the same tensor (`hf_hooks.POINTS`); each such hook is then called from
a torch hook with its own `HookPoint`, so it sees the same tensor and hook name. Any other
hook (attention patterns, norm internals, backward hooks) keeps the forward on the bridge, as
do captures and `last_logits_given_delta` (forward-mode AD needs the bridge's eager attention).
`fast_decode=False` (or `LENS_STEER_FAST_DECODE=0`) keeps everything on the bridge;
`last_decode_path` says which path the last generation took. If you replace (not update in
place) a bridge parameter, load the model again: the HF modules share the old tensor.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lens_steer.backends.base import ModelBackend, TokenIds
from lens_steer.backends.compat import patch_bridge_kv_cache
from lens_steer.backends.hf_common import (
    KVState,
    capture_in_chunks,
    chunked_prefill,
    gather_pattern,
    load_tokenizer,
    position_ids,
)
from lens_steer.backends.hf_hooks import (
    apply_all,
    arch_of,
    edit_points,
    fast_decode_enabled,
    register,
    shared_model,
)
from lens_steer.interventions import Edit
from lens_steer.sites import Site, validate_site

# Editing ln_final.hook_normalized is a supported site edit; the bridge's notice about it is not
# something the user can act on.
warnings.filterwarnings("ignore", message="A forward hook edited hook_scale/hook_normalized")


def bridge_hook(site: Site) -> str:
    """The bridge hook point serving `site`: its own name, except `ln_final.hook_normalized`,
    which is the final norm's output (`ln_final.hook_out`, after the weight) in lens_steer."""
    return "ln_final.hook_out" if site.kind == "ln_final" else site.name


_SERVED = [(re.compile(rf"blocks\.(\d+)\.{hook}"), point) for hook, point in (
    ("hook_resid_pre", "resid_pre"), ("hook_resid_post", "resid_post"),
    ("hook_attn_out", "attn_out"), ("hook_mlp_out", "mlp_out"), ("hook_resid_mid", "ln2_in"),
    (r"attn\.hook_z", "z"))] + [(re.compile(r"ln_final\.hook_out()"), "ln_final")]
"""Bridge hook names (any alias of a hook point) -> the `hf_hooks` point with the same tensor
(the bridge's `hook_resid_mid` is the input of the MLP's norm, as `ln2_in`)."""


def _served(names: list[str]) -> tuple[str, int | None] | None:
    for name in names:
        for pattern, point in _SERVED:
            m = pattern.fullmatch(name)
            if m:
                return point, int(m.group(1)) if m.group(1) else None
    return None


DEFAULT_PREFILL_CHUNK = 2048
"""Captures of longer batches run this many columns at a time through the KV cache, so memory
grows linearly with the trace (the bridge's eager attention is quadratic in one forward)."""


class TransformerLensBackend(ModelBackend):
    name = "transformer_lens"

    def __init__(self, source: str, device: torch.device, dtype: torch.dtype,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, fast_decode: bool = True,
                 **options: Any):
        from transformer_lens.model_bridge import TransformerBridge

        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError("prefill_chunk must be a positive number of tokens (or None)")
        self.prefill_chunk = prefill_chunk
        self.source = source
        self._session: set[Site] = set()
        self._step: dict[Site, list[Edit]] = {}
        self.fast_decode = fast_decode
        self.last_decode_path: str | None = None
        """'hf' (decode steps on the shared HF modules) or 'bridge', for the last generation."""
        self._fast_model: Any = None  # built at the first fast generation; False: unusable
        self._fast = False
        self._points: list[tuple[list[str], Any]] | None = None
        self.tokenizer = load_tokenizer(source)
        self.bridge = TransformerBridge.boot_transformers(
            source, tokenizer=self.tokenizer, device=str(device), dtype=dtype, **options)
        self.bridge.eval()
        patch_bridge_kv_cache(self.bridge)  # transformers >= 5.24: see backends/compat.py
        cfg = self.bridge.cfg
        self.n_layers = int(cfg.n_layers)
        self.d_model = int(cfg.d_model)
        self.n_heads = int(cfg.n_heads)
        self.d_head = int(cfg.d_head)
        self.device, self.dtype = device, dtype

    @property
    def hf_model(self):
        return self.bridge.original_model

    # -- one forward with edits and captures ---------------------------------------------------
    def _run(self, input_ids: Tensor, mask: Tensor, edits: Sequence[Edit],
             captures: list[tuple[str, Callable]] = (), **kwargs) -> Any:
        hooks = _edit_hooks(edits) + list(captures)
        with self.bridge.hooks(fwd_hooks=hooks) if hooks else nullcontext():
            return self.bridge(input_ids, attention_mask=mask,
                               position_ids=position_ids(mask, input_ids.shape[1]), **kwargs)

    # -- reading activations -------------------------------------------------------------------
    @torch.no_grad()
    def capture(self, sequences: Sequence[TokenIds], sites: Sequence[str | Site | int],
                positions: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        sites, input_ids, mask, rows, cols = self._capture_batch(sequences, sites, positions)
        width = input_ids.shape[1]
        captured: dict[str, Tensor] = {}

        def keep(site: Site):
            def hook(x: Tensor, hook) -> None:
                if site.kind == "pattern":
                    captured[site.name] = gather_pattern(x, rows, cols, [len(q) for q in sequences])
                else:
                    captured[site.name] = x[rows.to(x.device), cols.to(x.device)].detach() \
                        .float().cpu()
            return hook

        edits = self.forward_edits(sequences, width)
        if self.prefill_chunk and width > self.prefill_chunk:
            return self._capture_chunked(input_ids, mask, sites, rows, cols, edits)
        stop = None if any(s.layer is None for s in sites) else max(s.layer for s in sites) + 1
        self._run(input_ids, mask, edits, [(bridge_hook(s), keep(s)) for s in sites],
                  stop_at_layer=stop)
        return {s.name: captured[s.name] for s in sites}

    def _capture_chunked(self, input_ids, mask, sites, rows, cols, edits):
        """`prefill_chunk` columns at a time through the KV cache (the wrapped HF stack runs,
        so every bridge hook fires); each chunk's gathered rows leave at once."""
        from transformers import DynamicCache

        if any(s.kind == "pattern" for s in sites):
            raise NotImplementedError(
                "attention patterns are not captured in chunks: pass prefill_chunk=None to "
                "load_model (memory then grows with the square of the trace)")
        chunk, width = self.prefill_chunk, input_ids.shape[1]
        past = DynamicCache(config=self.hf_model.config)

        def span(start: int, end: int, r: Tensor, c: Tensor) -> dict[str, Tensor]:
            got: dict[str, Tensor] = {}

            def keep(site: Site):
                def hook(x: Tensor, hook) -> None:
                    got[site.name] = x[r.to(x.device), c.to(x.device)].detach().float().cpu()
                return hook

            hooks = _edit_hooks([e.columns(start, end) for e in edits]) + \
                [(bridge_hook(s), keep(s)) for s in sites]
            with self.bridge.hooks(fwd_hooks=hooks):
                self.hf_model.base_model(
                    input_ids=input_ids[:, start:end], attention_mask=mask[:, :end],
                    position_ids=position_ids(mask[:, :end], end - start),
                    past_key_values=past, use_cache=True)
            return got

        return capture_in_chunks(span, rows, cols, width, chunk, [s.name for s in sites])

    @torch.no_grad()
    def logits(self, sequences: Sequence[TokenIds]) -> list[Float[Tensor, "pos vocab"]]:
        input_ids, mask = self.pad_batch(sequences)
        edits = self.forward_edits(sequences, input_ids.shape[1])
        out = self._fast_logits(input_ids, mask, edits)
        if out is None:
            out = self._run(input_ids, mask, edits)
        return [out[b, mask[b].bool()].float().cpu() for b in range(len(sequences))]

    def _fast_logits(self, input_ids, mask, edits: list[Edit]) -> Tensor | None:
        """A plain forward on the shared HF modules (same rule as decoding), or None."""
        if self._session:  # inside a generation: its hooks are on the shared model already
            return None
        step: dict[Site, list[Edit]] = {}
        for e in edits:
            step.setdefault(e.site, []).append(e)
        handles = self._fast_hooks(list(step))
        if handles is None:
            return None
        self._step = step
        try:
            return self._fast_model(input_ids, attention_mask=mask,
                                    position_ids=position_ids(mask, input_ids.shape[1]),
                                    use_cache=False).logits
        finally:
            self._step = {}
            for h in handles:
                h.remove()

    # -- generation -------------------------------------------------------------------------------
    @contextmanager
    def decoding(self, sites: Sequence[Site]) -> Iterator[None]:
        """One hook per edited site for a whole generation (adding and removing hooks every
        step costs about as much as the edit on small models). Each applies the current step's
        edits from `_step` and is the identity otherwise. On the fast path they are torch hooks
        on the shared HF modules (after any bridge hooks the user attached, as on the bridge)."""
        self._session = set(sites)
        handles = self._fast_hooks(sites)
        self._fast = handles is not None
        self.last_decode_path = "hf" if self._fast else "bridge"
        try:
            if self._fast:
                yield
            else:
                hooks = []
                for site in sorted(set(sites), key=lambda s: s.order):
                    hooks += _site_hooks(site, _current(self, site))
                with self.bridge.hooks(fwd_hooks=hooks):
                    yield
        finally:
            for h in handles or ():
                h.remove()
            self._session, self._step, self._fast = set(), {}, False

    def _fast_hooks(self, sites: Sequence[Site]) -> list | None:
        """Torch hooks on the shared HF model: every bridge hook the user has attached (called
        with its own `HookPoint`), then our edits at `sites`; None when a bridge hook has no
        torch equivalent (or fast decoding is off / impossible)."""
        if not fast_decode_enabled(self.fast_decode):
            return None
        arch = arch_of(self.hf_model)
        if arch is None:
            return None
        if self._points is None:
            groups: dict[int, tuple[list[str], Any]] = {}
            for name, hp in self.bridge.hook_dict.items():
                groups.setdefault(id(hp), ([], hp))[0].append(name)
            self._points = list(groups.values())
        points = []
        for names, hp in self._points:
            if not (hp._forward_hooks or hp._forward_pre_hooks or hp._backward_hooks
                    or hp._backward_pre_hooks):
                continue
            served = _served(names)
            if served is None or hp._forward_pre_hooks or hp._backward_hooks \
                    or hp._backward_pre_hooks:
                return None
            points += [(*served, _calling(hp, fn)) for fn in hp._forward_hooks.values()]
        if self._fast_model is None:
            self._fast_model = shared_model(self.hf_model) or False
        if self._fast_model is False:
            return None
        points += edit_points(sites, lambda s: self._step.get(s), self.n_heads)
        return register(self._fast_model, arch, points)

    def forward_step(self, input_ids, attention_mask, past, edits):
        width, chunk = input_ids.shape[1], self.prefill_chunk
        if not chunk or width <= chunk:
            return self._forward_step(input_ids, attention_mask, past, edits)
        return chunked_prefill(self._forward_step, input_ids, attention_mask, past, edits, chunk)

    def _forward_step(self, input_ids, attention_mask, past, edits):
        step: dict[Site, list[Edit]] = {}
        outside: list[Edit] = []
        for e in edits:
            if e.site in self._session:
                step.setdefault(e.site, []).append(e)
            else:
                outside.append(e)
        self._step = step
        if self._fast and not outside:
            try:
                out = self._fast_model(
                    input_ids, attention_mask=attention_mask,
                    position_ids=position_ids(attention_mask, input_ids.shape[1]),
                    past_key_values=None if past is None else past.cache, use_cache=True,
                    logits_to_keep=1)
            finally:
                self._step = {}
            return out.logits[:, -1], KVState(out.past_key_values)
        try:
            logits, cache = self._run(
                input_ids, attention_mask, outside, return_type="logits_and_cache",
                past_key_values=None if past is None else past.cache, use_cache=True)
        finally:
            self._step = {}
        return logits[:, -1], KVState(cache)

    def last_logits_given_delta(self, sequence: TokenIds, layer: int,
                                delta: Float[Tensor, "d_model"]) -> Float[Tensor, "vocab"]:
        site = validate_site(layer, self.n_layers)
        ids = torch.tensor([list(sequence)], device=self.device)
        mask = torch.ones_like(ids)
        last = torch.zeros(1, len(sequence), dtype=torch.bool, device=self.device)
        last[0, -1] = True
        edits = self.forward_edits([sequence], len(sequence))
        edits.append(Edit(site, last, "add", delta, 1.0, None, None, -1))
        return self._run(ids, mask, edits)[0, -1]

    def forward_embeds(self, inputs_embeds, attention_mask, position_ids, past=None, sites=()):
        """Runs the wrapped Hugging Face stack, whose modules are the bridge's components, so
        every TransformerLens hook (and `sites`) fires on these positions; differentiable."""
        from transformers import DynamicCache

        from lens_steer.backends.base import EmbedsOutput

        unknown = [s for s in sites if s not in self.bridge.hook_dict]
        if unknown:
            raise ValueError(f"unknown TransformerLens hook name(s) {unknown}")
        past = past if past is not None else DynamicCache(config=self.hf_model.config)
        captured: dict[str, Tensor] = {}

        def keep(name: str):
            def hook(x: Tensor, hook) -> None:
                captured[name] = x
            return hook

        hooks = [("ln_final.hook_out" if s == "ln_final.hook_normalized" else s, keep(s))
                 for s in sites]  # our ln_final site is after the norm's weight (bridge_hook)
        with self.bridge.hooks(fwd_hooks=hooks) if sites else nullcontext():
            out = self.hf_model.base_model(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                position_ids=position_ids, past_key_values=past, use_cache=True)
        return EmbedsOutput(out.last_hidden_state, past, captured)


def _edit_hooks(edits: Sequence[Edit]) -> list[tuple[str, Callable]]:
    """Bridge hooks applying `edits` (grouped by site, in forward order)."""
    by_site: dict[Site, list[Edit]] = {}
    for e in edits:
        by_site.setdefault(e.site, []).append(e)
    hooks = []
    for site in sorted(by_site, key=lambda s: s.order):
        hooks += _site_hooks(site, _const(by_site[site]))
    return hooks


def _calling(hp, fn: Callable) -> Callable[[Tensor], Tensor | None]:
    """A bridge hook (the torch hook TransformerLens registered on `hp`, which converts the
    tensor and passes `hook=hp` to the user's function) as an `hf_hooks` body."""
    return lambda x: fn(hp, (x,), x)


def _const(edits: list[Edit]) -> Callable[[], list[Edit]]:
    return lambda: edits


def _current(backend: TransformerLensBackend, site: Site) -> Callable[[], list[Edit]]:
    return lambda: backend._step.get(site)


def _site_hooks(site: Site, get: Callable[[], list[Edit] | None]) -> list[tuple[str, Callable]]:
    """Bridge hooks applying `get()`'s edits at `site` (identity when it returns nothing)."""
    if site.kind == "resid_mid":
        pre: dict[str, Tensor] = {}

        def keep_pre(x: Tensor, hook) -> None:
            pre["x"] = x

        def edit_mid(attn_out: Tensor, hook) -> Tensor:
            edits = get()
            if not edits:
                return attn_out
            return apply_all(pre["x"] + attn_out, edits) - pre["x"]

        return [(Site("resid_pre", site.layer).name, keep_pre),
                (Site("attn_out", site.layer).name, edit_mid)]

    def edit(x: Tensor, hook) -> Tensor:
        edits = get()
        return x if not edits else apply_all(x, edits)

    return [(bridge_hook(site), edit)]
