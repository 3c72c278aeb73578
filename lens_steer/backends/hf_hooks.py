"""Decode steps on the plain Hugging Face modules, with sites served by ordinary torch hooks.

Both backends decode through here when every hook a generation needs sits at a point a torch
hook reaches with the same tensor (the fast path, issue 19): the TransformerBridge re-implements
attention and norms in Python and wraps every submodule (about 2x the Python calls of plain
HF per decode step), and an nnsight trace costs a few ms a step. Served points, as raw tensors
(what a bridge `HookPoint` sees before its own conversion):

    resid_pre L   input hidden_states of decoder layer L      (blocks.L.hook_resid_pre)
    resid_post L  output of decoder layer L                   (blocks.L.hook_resid_post)
    attn_out L    output[0] of its attention                  (blocks.L.hook_attn_out)
    mlp_out L     output of its MLP                           (blocks.L.hook_mlp_out)
    ln2_in L      input of the norm before the MLP            (the bridge's blocks.L.hook_resid_mid)
    z L           input of the attention's output projection, flat (blocks.L.attn.hook_z)
    ln_final      output of the final norm, after its weight  (ln_final.hook_normalized here;
                                                               the bridge's ln_final.hook_out)

Module paths per architecture are `nnsight_sites.ARCHS`. Anything else (attention patterns,
the bridge's internal hooks) needs the backend's own machinery; callers fall back to it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lens_steer.backends.nnsight_sites import ARCHS, Arch
from lens_steer.interventions import Edit
from lens_steer.sites import Site

Fn = Callable[[Tensor], Tensor | None]
"""A hook body: the raw tensor in, the replacement (or None: unchanged) out."""
POINTS = ("resid_pre", "resid_post", "attn_out", "mlp_out", "ln2_in", "z", "ln_final")

ENV = "LENS_STEER_FAST_DECODE"
"""Set to 0 to decode through the backend's own machinery (bridge / nnsight trace) always."""


def fast_decode_enabled(option: bool) -> bool:
    """The backend's `fast_decode` option, unless the environment switches the path off."""
    return bool(option) and os.environ.get(ENV, "1") not in ("0", "false", "no", "off")


def arch_of(hf: nn.Module) -> Arch | None:
    return ARCHS.get(str(getattr(hf.config, "model_type", "")))


def _chain(fns: Sequence[Fn]) -> Callable[[Tensor], Tensor]:
    if len(fns) == 1:
        fn = fns[0]

        def one(x: Tensor) -> Tensor:
            y = fn(x)
            return x if y is None else y
        return one

    def run(x: Tensor) -> Tensor:
        for fn in fns:
            y = fn(x)
            x = x if y is None else y
        return x
    return run


def register(hf: nn.Module, arch: Arch, points: Sequence[tuple[str, int | None, Fn]]
             ) -> list[torch.utils.hooks.RemovableHandle]:
    """Torch hooks calling each `(point, layer, fn)` (several at one point run in the given
    order). Returns the handles; remove them when the generation ends."""
    grouped: dict[tuple[str, int | None], list[Fn]] = {}
    for point, layer, fn in points:
        if point not in POINTS:
            raise ValueError(f"unknown hook point {point!r}")
        grouped.setdefault((point, layer), []).append(fn)
    layers = hf.get_submodule(arch.layers)
    handles = []
    for (point, layer), fns in grouped.items():
        run = _chain(fns)
        if point == "ln_final":
            handles.append(hf.get_submodule(arch.norm).register_forward_hook(_on_output(run)))
            continue
        block = layers[layer]
        if point == "resid_pre":
            handles.append(block.register_forward_pre_hook(_on_hidden_input(run),
                                                           with_kwargs=True))
        elif point == "resid_post":
            handles.append(block.register_forward_hook(_on_output(run)))
        elif point == "attn_out":
            handles.append(block.get_submodule(arch.attn).register_forward_hook(_on_output(run)))
        elif point == "mlp_out":
            handles.append(block.get_submodule(arch.mlp).register_forward_hook(_on_output(run)))
        elif point == "ln2_in":
            handles.append(block.get_submodule(arch.ln2).register_forward_pre_hook(
                _on_first_input(run)))
        else:  # z
            handles.append(block.get_submodule(arch.o_proj).register_forward_pre_hook(
                _on_first_input(run)))
    return handles


def _on_output(run):
    def hook(module, args, out):
        if isinstance(out, Tensor):
            return run(out)
        return (run(out[0]), *out[1:])
    return hook


def _on_first_input(run):
    def hook(module, args):
        return (run(args[0]), *args[1:])
    return hook


def _on_hidden_input(run):
    def hook(module, args, kwargs):
        if args:
            return (run(args[0]), *args[1:]), kwargs
        kwargs["hidden_states"] = run(kwargs["hidden_states"])
        return args, kwargs
    return hook


def edit_points(sites: Sequence[Site], current: Callable[[Site], list[Edit] | None],
                n_heads: int) -> list[tuple[str, int | None, Fn]]:
    """Hook bodies applying `current(site)`'s edits at each of `sites` (identity when it returns
    nothing), with the same semantics as the nnsight trace (`nnsight_sites.trace_body`):
    `resid_mid` edits reach the residual through attn_out; `z` is viewed (n_heads, d_head)."""
    points: list[tuple[str, int | None, Fn]] = []
    for site in sorted(set(sites), key=lambda s: s.order):
        if site.kind == "resid_mid":
            pre: dict[str, Tensor] = {}

            def keep(x: Tensor, pre=pre) -> None:
                pre["x"] = x

            def mid(a: Tensor, site=site, pre=pre) -> Tensor | None:
                edits = current(site)
                if not edits:
                    return None
                return apply_all(pre["x"] + a, edits) - pre["x"]

            points += [("resid_pre", site.layer, keep), ("attn_out", site.layer, mid)]
        elif site.kind == "z":
            def z(x: Tensor, site=site) -> Tensor | None:
                edits = current(site)
                if not edits:
                    return None
                heads = x.reshape(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)
                return apply_all(heads, edits).reshape(x.shape)

            points.append(("z", site.layer, z))
        elif site.kind in ("resid_pre", "resid_post", "attn_out", "mlp_out", "ln_final"):
            def edit(x: Tensor, site=site) -> Tensor | None:
                edits = current(site)
                return None if not edits else apply_all(x, edits)

            points.append((site.kind, site.layer, edit))
        else:
            raise ValueError(f"{site.name} is not served by torch hooks")
    return points


def apply_all(x: Tensor, edits: Sequence[Edit]) -> Tensor:
    """`edits` applied in order, each through `Edit.apply` (one or two ops for a full mask)."""
    for e in edits:
        x = e.apply(x)
    return x


def shared_model(wrapped: nn.Module, attn_implementation: str = "sdpa") -> nn.Module | None:
    """A plain HF model of `wrapped`'s class whose parameters ARE `wrapped`'s (no copy): state
    dict keys with the bridge's `._original_component` segments removed, assigned. None when the
    module tree does not line up (an unknown wrapper) or the bridge added a non-zero bias."""
    params = {k.replace("._original_component", ""): v
              for k, v in wrapped.state_dict(keep_vars=True).items()}
    buffers = {k.replace("._original_component", ""): v for k, v in wrapped.named_buffers()}
    bias = params.pop("lm_head.bias", None)
    if bias is not None and bias.detach().abs().max() > 0:
        return None
    cfg = wrapped.config.__class__.from_dict(wrapped.config.to_dict())
    cls = type(wrapped)
    if attn_implementation == "sdpa" and not getattr(cls, "_supports_sdpa", False):
        attn_implementation = "eager"
    cfg._attn_implementation = attn_implementation
    with torch.device("meta"):
        fast = cls(cfg)
    missing, unexpected = fast.load_state_dict(params, strict=False, assign=True)
    own_buffers = dict(fast.named_buffers())
    del unexpected  # the bridge's aliases of the same parameters (blocks.0.ln1.weight, ...)
    if any(m not in buffers for m in missing):
        return None
    for name in own_buffers:
        if name not in buffers:
            return None
        owner, _, leaf = name.rpartition(".")
        module = fast.get_submodule(owner)
        module.register_buffer(leaf, buffers[name],
                               persistent=leaf not in module._non_persistent_buffers_set)
    if any(t.is_meta for t in (*fast.parameters(), *fast.buffers())):
        return None
    return fast.eval()
