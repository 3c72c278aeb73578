"""2-D maps of thought activations (PCA, t-SNE) for the report's scatter plots."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from probes.metrics import seeded_subsample


def embed_2d(x: Float[torch.Tensor, "n d"], y: np.ndarray, classes: Sequence, *,
             tsne: bool = True, max_points: int = 1500, seed: int = 0) -> dict:
    """PCA (and t-SNE) 2-D coordinates of a seeded subsample of standardised activations."""
    idx = seeded_subsample(len(y), max_points, seed)
    a = x[idx].float()
    sd = a.std(0)
    a = ((a - a.mean(0)) / torch.where(sd > 0, sd, torch.ones_like(sd))).numpy()
    ncomp = min(50, a.shape[0], a.shape[1])
    pca = PCA(n_components=ncomp, random_state=seed).fit(a)
    proj = pca.transform(a)
    out = {"pca": proj[:, :2], "explained_variance": pca.explained_variance_ratio_[:2].tolist(),
           "labels": [str(classes[i]) for i in y[idx]], "tsne": None}
    if tsne and len(idx) >= 5:
        perplexity = float(min(30.0, (len(idx) - 1) / 3))
        out["tsne"] = TSNE(n_components=2, init="pca", perplexity=perplexity,
                           random_state=seed).fit_transform(proj)
    return out
