"""Synthetic thought activations with planted linear class structure (tests and benchmarks)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from lens_steer.thoughts import LABELS


def synthetic_thoughts(n: int = 1000, d: int = 64, n_layers: int = 4, *,
                       signal_layers: Sequence[int] = (2,), strength: float = 1.0,
                       thoughts_per_trace: int = 20,
                       proportions: Sequence[float] = (0.6, 0.25, 0.15),
                       classes: Sequence = LABELS,
                       seed: int = 0):
    """Activations with planted linear class structure in `signal_layers` (class-mean shifts of
    norm ~`strength` x noise scale along random directions) and none elsewhere; anisotropic
    noise with a few large-magnitude dimensions and a per-trace offset, like LM residuals.
    Returns (activations [layer, n, d], labels, groups)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    labels = list(rng.choice(np.array(classes, dtype=object), size=n, p=list(proportions)))
    groups = [f"trace{i // thoughts_per_trace}" for i in range(n)]
    y = torch.as_tensor([list(classes).index(v) for v in labels])
    scale = torch.linspace(0.2, 2.0, d)[torch.randperm(d, generator=g)]
    scale[torch.randperm(d, generator=g)[:3]] = 30.0  # "massive activation" dims
    n_tr = (n + thoughts_per_trace - 1) // thoughts_per_trace
    x = torch.empty(n_layers, n, d)
    for layer in range(n_layers):
        trace_off = 0.5 * torch.randn(n_tr, d, generator=g)[torch.arange(n) // thoughts_per_trace]
        x[layer] = (torch.randn(n, d, generator=g) + trace_off) * scale + 5.0
        if layer in signal_layers:
            dirs = torch.randn(len(classes), d, generator=g) / math.sqrt(d)
            x[layer] += strength * math.sqrt(d) * dirs[y] * scale.clamp(max=2.0)
    return x, labels, groups
