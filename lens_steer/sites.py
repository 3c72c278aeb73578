"""One site vocabulary for capture, caching, probing and editing: TransformerLens hook names.

    blocks.L.hook_resid_pre     residual stream entering block L  = HF hidden_states[L]
    blocks.L.hook_resid_mid     residual after block L's attention, before its MLP
    blocks.L.hook_resid_post    residual leaving block L          = HF hidden_states[L + 1]
    blocks.L.hook_attn_out      block L's attention output (what it adds to the residual)
    blocks.L.hook_mlp_out       block L's MLP output
    blocks.L.attn.hook_z        per-head attention values before the output projection
                                (n_heads, d_head); operations may pick one head
    blocks.L.attn.hook_pattern  attention probabilities (n_heads, key positions); capture only
    ln_final.hook_normalized    the final norm's output, AFTER its weight (and bias): the tensor
                                the unembedding reads (HF's last hidden state), so
                                `model.unembed(x)` gives the logits (logit lens)

`ln_final.hook_normalized` differs from TransformerLens's own hook of that name, which is taken
before the norm's weight (TransformerLens folds the weight into the unembedding): ours is the
bridge's `ln_final.hook_normalized` times `ln_final.weight` (plus any bias). Both backends serve the
post-weight tensor, for capture and for edits (the TransformerLens backend through the bridge's
`ln_final.hook_out`).

`blocks.{L-1}.hook_resid_post` and `blocks.L.hook_resid_pre` are the same tensor. Both backends
accept these names; a bare int means `resid_post` of that block (what a layer meant before
sites existed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lens_steer.errors import ConfigError

_BLOCK_HOOKS = {
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out",
    "z": "attn.hook_z", "pattern": "attn.hook_pattern",
}
KINDS = (*_BLOCK_HOOKS, "ln_final")
"""Site kinds, in the order they run inside a block (ln_final after every block)."""
_RANK = {"resid_pre": 0, "z": 1, "pattern": 2, "attn_out": 2, "resid_mid": 3, "mlp_out": 4,
         "resid_post": 5}
_PATTERN = re.compile(r"blocks\.(\d+)\.(" + "|".join(re.escape(h) for h in _BLOCK_HOOKS.values())
                      + r")")
_BY_HOOK = {h: k for k, h in _BLOCK_HOOKS.items()}
SUPPORTED = ("blocks.L.hook_resid_pre, blocks.L.hook_resid_mid, blocks.L.hook_resid_post, "
             "blocks.L.hook_attn_out, blocks.L.hook_mlp_out, blocks.L.attn.hook_z, "
             "blocks.L.attn.hook_pattern (capture only), ln_final.hook_normalized")


@dataclass(frozen=True)
class Site:
    """A hook point: `kind` (one of `KINDS`) in block `layer` (None for `ln_final`)."""

    kind: str
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown site kind {self.kind!r}; supported sites: {SUPPORTED}")
        if (self.kind == "ln_final") != (self.layer is None):
            raise ConfigError(f"site {self.kind!r} needs "
                              + ("no layer" if self.kind == "ln_final" else "a block index"))
        if self.layer is not None and (not isinstance(self.layer, int) or self.layer < 0):
            raise ConfigError(f"block index must be a non-negative int, got {self.layer!r}")

    @property
    def name(self) -> str:
        """The TransformerLens hook name, e.g. `blocks.3.hook_resid_post`."""
        if self.kind == "ln_final":
            return "ln_final.hook_normalized"
        return f"blocks.{self.layer}.{_BLOCK_HOOKS[self.kind]}"

    @property
    def per_head(self) -> bool:
        return self.kind in ("z", "pattern")

    @property
    def editable(self) -> bool:
        return self.kind != "pattern"

    @property
    def order(self) -> tuple[float, int]:
        """Sort key: the order in which a forward pass reaches the site."""
        return (float("inf"), 0) if self.layer is None else (self.layer, _RANK[self.kind])

    def __str__(self) -> str:
        return self.name


def parse_site(site: str | Site | int) -> Site:
    """A `Site` from a hook name, a `Site`, or an int (= `resid_post` of that block)."""
    if isinstance(site, Site):
        return site
    if isinstance(site, int) and not isinstance(site, bool):
        return Site("resid_post", site)
    if isinstance(site, str):
        if site == "ln_final.hook_normalized":
            return Site("ln_final")
        m = _PATTERN.fullmatch(site)
        if m:
            return Site(_BY_HOOK[m.group(2)], int(m.group(1)))
    raise ConfigError(f"unknown site {site!r}; supported sites: {SUPPORTED} (L = block index)")


def validate_site(site: str | Site | int, n_layers: int) -> Site:
    """Parse `site` and check its block exists in a model with `n_layers` blocks."""
    s = parse_site(site)
    if s.layer is not None and s.layer >= n_layers:
        raise ConfigError(f"unknown layer {s.layer} in site {s.name!r}: this model has layers "
                          f"0..{n_layers - 1}")
    return s


def resid_pre(layer: int) -> str:
    return Site("resid_pre", layer).name


def resid_post(layer: int) -> str:
    return Site("resid_post", layer).name


def all_sites(n_layers: int) -> list[str]:
    """Every supported site name of a model with `n_layers` blocks, in forward order."""
    sites = [Site(k, layer) for layer in range(n_layers) for k in _BLOCK_HOOKS]
    return [s.name for s in sorted(sites, key=lambda s: s.order)] + ["ln_final.hook_normalized"]
