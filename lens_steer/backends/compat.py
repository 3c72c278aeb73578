"""Workarounds for version mismatches between TransformerLens and transformers.

transformers 5.24 renamed the KV-cache keyword `past_key_values` to `cache` in every model's
forward (`@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")`; the decoder layers
now call `self.self_attn(..., cache=cache)`). TransformerLens 4.3's bridge replaces the attention
forward (`PositionEmbeddingsAttentionBridge.forward`, and the other reconstructed attentions),
whose `AttentionBridge._update_kv_cache` (generalized_components/attention.py) looks only for
`past_key_values` / `layer_past` in its kwargs. Under transformers >= 5.24 it finds neither, skips
`cache.update(...)`, and every forward hands back an empty `DynamicCache`: cached decoding then
attends to the newest token alone. Upstream fix: `_update_kv_cache` should also read `cache`.
Until a TransformerLens release does, `patch_bridge_kv_cache` maps `cache` to `past_key_values`
on the bridge's own attention modules (per instance, so no global state changes).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def patch_bridge_kv_cache(bridge: nn.Module) -> int:
    """Make each attention of `bridge` update a cache passed as `cache=` (transformers >= 5.24).

    Idempotent and harmless on older transformers (the kwarg is then never `cache`). Returns the
    number of attention modules patched.
    """
    patched = 0
    for module in bridge.modules():
        update = getattr(type(module), "_update_kv_cache", None)
        if update is None or getattr(module, "_lens_steer_cache_patch", False):
            continue
        module._update_kv_cache = _accepting_cache_kwarg(module, update)
        module._lens_steer_cache_patch = True
        patched += 1
    return patched


def _accepting_cache_kwarg(module: nn.Module, update):
    def _update_kv_cache(k, v, **kwargs: Any):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs["past_key_values"] = kwargs["cache"]
        return update(module, k, v, **kwargs)
    return _update_kv_cache
