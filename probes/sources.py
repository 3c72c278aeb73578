"""Where activations come from: a {layer: [n, d]} mapping, a [layer, n, d] tensor, or a thought
cache read one layer at a time."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from jaxtyping import Float

Activations = Mapping[int, Float[torch.Tensor, "n d"]] | Float[torch.Tensor, "layer n d"]


class LayerSource:
    """Uniform, lazy access to per-layer activations from a dict, a Mapping or a 3-D tensor."""

    def __init__(self, activations: Activations, layers: Sequence[int] | None):
        if isinstance(activations, torch.Tensor):
            if activations.ndim != 3:
                raise ValueError(f"activations tensor must be [layer, n, d], got shape "
                                 f"{tuple(activations.shape)}")
            ids = list(layers) if layers is not None else list(range(activations.shape[0]))
            if len(ids) != activations.shape[0]:
                raise ValueError(f"{len(ids)} layer ids for {activations.shape[0]} layers")
            self._get: Callable[[int], torch.Tensor] = lambda i: activations[ids.index(i)]
            self.layers = ids
            self.description = f"tensor {tuple(activations.shape)}"
        elif isinstance(activations, Mapping):
            ids = list(layers) if layers is not None else sorted(activations.keys())
            missing = [i for i in ids if i not in activations]
            if missing:
                raise ValueError(f"layers {missing} not in activations (have "
                                 f"{sorted(activations.keys())})")
            self._get = lambda i: activations[i]
            self.layers = ids
            self.description = getattr(activations, "description", f"{len(ids)} layers")
        else:
            raise TypeError("activations must be a {layer: [n, d] tensor} mapping or a "
                            f"[layer, n, d] tensor, got {type(activations).__name__}")
        if not self.layers:
            raise ValueError("no layers to probe: activations are empty")
        first = self.get(self.layers[0])
        if first.ndim != 2:
            raise ValueError(f"layer {self.layers[0]} activations must be [n, d], got "
                             f"{tuple(first.shape)}")
        self.n, self.d = first.shape

    def get(self, layer: int) -> Float[torch.Tensor, "n d"]:
        x = torch.as_tensor(self._get(layer))
        if hasattr(self, "n") and tuple(x.shape) != (self.n, self.d):
            raise ValueError(f"layer {layer} has shape {tuple(x.shape)}, expected "
                             f"{(self.n, self.d)}")
        return x.detach().float()


class CacheLayers(Mapping):
    """A `ThoughtCache` as a lazy {layer: activations} mapping (each layer read on access)."""

    def __init__(self, cache):
        self.cache = cache
        self.description = f"cache {getattr(cache, 'out_dir', cache)!s}"

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self.cache.layers:
            raise KeyError(layer)
        return self.cache.activations(layer)

    def __iter__(self):
        return iter(self.cache.layers)

    def __len__(self) -> int:
        return len(self.cache.layers)
