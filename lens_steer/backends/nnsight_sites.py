"""Where each site (`lens_steer.sites`) lives in a Hugging Face model, per architecture, and the
code that edits and saves sites inside one nnsight trace.

    resid_pre L   input of decoder layer L            resid_post L  output of decoder layer L
    attn_out L    output[0] of its attention           mlp_out L     output of its MLP
    z L           input of the attention's output projection, viewed (n_heads, d_head)
    pattern L     output[1] of its attention (needs eager attention: switched on for the trace)
    resid_mid L   read: input of the norm before the MLP; edit: through attn_out
                  (attn_out' = f(resid_pre + attn_out) - resid_pre), since that norm's input is
                  not the residual the block adds the MLP to
    ln_final      output of the final norm

Only plain torch runs inside the trace body (`trace_body`, `apply_edits`): nnsight ships it by
value to NDIF (`remote=True`) and through its serialisation check (`remote="local"`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lens_steer.errors import ConfigError
from lens_steer.interventions import Edit, apply_edits
from lens_steer.sites import Site


@dataclass(frozen=True)
class Arch:
    """Module paths of one architecture (dotted, from the `*ForCausalLM` root / its block)."""

    layers: str
    attn: str
    o_proj: str
    mlp: str
    ln2: str
    norm: str


_LLAMA_LIKE = Arch("model.layers", "self_attn", "self_attn.o_proj", "mlp",
                   "post_attention_layernorm", "model.norm")
ARCHS: dict[str, Arch] = {
    "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE, "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gpt2": Arch("transformer.h", "attn", "attn.c_proj", "mlp", "ln_2", "transformer.ln_f"),
}
"""model_type -> module paths. Add an architecture with one line (same block structure: attention
then MLP, each added to the residual; pre-norms)."""


def arch_for(model_type: str) -> Arch:
    if model_type not in ARCHS:
        raise ConfigError(
            f"the nnsight backend has no site map for model_type {model_type!r}; supported: "
            f"{sorted(ARCHS)}. Use backend='transformer_lens', or add the module paths to "
            "lens_steer.backends.nnsight_sites.ARCHS")
    return ARCHS[model_type]


def at(envoy: Any, path: str) -> Any:
    for part in path.split("."):
        envoy = getattr(envoy, part)
    return envoy


def plan(edits: list[Edit], captures: list[Site]) -> dict[Any, dict[str, list]]:
    """{layer (None = ln_final): {kind: [edit args, save?]}} in plain Python values."""
    todo: dict[Any, dict[str, list]] = {}
    for e in edits:
        todo.setdefault(e.site.layer, {}).setdefault(e.site.kind, [[], False])[0].append(e.args())
    for s in captures:
        todo.setdefault(s.layer, {}).setdefault(s.kind, [[], False])[1] = True
    return todo


def _edit_save(x: Any, entry: Any, name: str, rows: Any, cols: Any, saved: dict
               ) -> tuple[Any, bool]:
    """`x` with the planned edits of `entry` (`plan`'s [edit args, save?]) applied, saved under
    `name` (gathered rows) when asked; and whether it changed (the caller writes it back)."""
    edits, keep = entry
    if edits:
        x = apply_edits(x, edits)
    if keep:
        saved[name] = x[rows, cols].save()
    return x, bool(edits)


def trace_body(root: Any, arch: Arch, todo: dict, rows: Any, cols: Any, n_heads: int,
               saved: dict) -> None:
    """Inside a trace: apply the planned edits and save the planned captures, visiting modules
    in the order the forward reaches them (nnsight requires it). Captures see edited values."""
    for layer in sorted(k for k in todo if k is not None):
        t = todo[layer]
        block = at(root, arch.layers)[layer]
        pre = None
        if "resid_pre" in t or ("resid_mid" in t and t["resid_mid"][0]):
            pre, edited = _edit_save(block.input, t.get("resid_pre", ([], False)),
                                     f"blocks.{layer}.hook_resid_pre", rows, cols, saved)
            if edited:
                block.input = pre
        if "z" in t:
            o_proj = at(block, arch.o_proj)
            x = o_proj.input
            z = x.reshape(x.shape[0], x.shape[1], n_heads, x.shape[-1] // n_heads)
            z, edited = _edit_save(z, t["z"], f"blocks.{layer}.attn.hook_z", rows, cols, saved)
            if edited:
                o_proj.input = z.reshape(x.shape)
        mid_edits = t.get("resid_mid", [[], False])[0]
        if "attn_out" in t or "pattern" in t or mid_edits:
            attn = at(block, arch.attn)
            out = attn.output
            a, edited = _edit_save(out[0], t.get("attn_out", ([], False)),
                                   f"blocks.{layer}.hook_attn_out", rows, cols, saved)
            if mid_edits:
                a = apply_edits(pre + a, mid_edits) - pre
            if edited or mid_edits:
                attn.output = (a, *out[1:])
            if "pattern" in t:
                saved[f"blocks.{layer}.attn.hook_pattern"] = out[1].save()
        if "resid_mid" in t and t["resid_mid"][1]:
            saved[f"blocks.{layer}.hook_resid_mid"] = at(block, arch.ln2).input[rows, cols].save()
        if "mlp_out" in t:
            mlp = at(block, arch.mlp)
            x, edited = _edit_save(mlp.output, t["mlp_out"], f"blocks.{layer}.hook_mlp_out",
                                   rows, cols, saved)
            if edited:
                mlp.output = x
        if "resid_post" in t:
            out = block.output
            x, edited = _edit_save(out[0] if isinstance(out, tuple) else out, t["resid_post"],
                                   f"blocks.{layer}.hook_resid_post", rows, cols, saved)
            if edited:
                block.output = (x, *out[1:]) if isinstance(out, tuple) else x
    if None in todo:
        norm = at(root, arch.norm)
        x, edited = _edit_save(norm.output, todo[None]["ln_final"], "ln_final.hook_normalized",
                               rows, cols, saved)
        if edited:
            norm.output = x
