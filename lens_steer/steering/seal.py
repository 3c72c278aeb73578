"""SEAL (Chen et al., 2025, "SEAL: Steerable Reasoning Calibration of Large Language Models"):
suppress reflection and transition thoughts by steering at the thought delimiters.

Extraction. Cache `resid_post` at layer L at the delimiter token opening each thought (the
thought cache, `lens_steer.cache`), label thoughts execution / reflection / transition, and take

    S = mean(h_L | execution) - mean(h_L | reflection ∪ transition)

Variants for the ablation study (`SealConfig.variant`): "both" (above), "reflection"
(mean(exec) - mean(refl)) and "transition" (mean(exec) - mean(trans)).

Application. H <- H + alpha * S at layer L, only on forward steps whose newest token is a `\\n\\n`
delimiter inside `<think>` (the position that opens the next thought, so the steer acts on the
thought about to be written); default alpha = 1.

The paper used layer 20 for DeepSeek-R1-Distill-Qwen-1.5B and -7B and layer 55 for
QwQ-32B-Preview, and built S from the model's own traces on 1,000 MATH training problems: 500
answered correctly and 500 incorrectly. On the toy reasoner (4 layers) `lens-steer seal` uses
layer 3 (about 2/3 of the depth) and the model's own greedy traces on 300 training problems.

    cache = load_cache("runs/seal/cache")
    vec = extract_seal_vector(cache, layer=3)
    out = model.generate(prompts, cfg, interventions=[seal_intervention(model, vec, alpha=1.0)])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from lens_steer.interventions import Intervention
from lens_steer.steering.vector import SteeringVector, think_delimiter_rule

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend

VARIANTS: dict[str, tuple[str, ...]] = {
    "both": ("reflection", "transition"),
    "reflection": ("reflection",),
    "transition": ("transition",),
}
"""Which labels each SEAL variant suppresses (steers away from)."""


@dataclass
class SealConfig:
    """How to extract and apply a SEAL vector."""

    layer: int = 20
    """Block whose resid_post is read and steered (paper: 20 for R1-Distill-Qwen-1.5B/7B,
    55 for QwQ-32B-Preview)."""
    variant: str = "both"
    """Labels suppressed: "both" (reflection ∪ transition), "reflection" or "transition"."""
    alpha: float = 1.0
    """Steering strength: H <- H + alpha * S on delimiter steps inside <think>."""
    keep: str = "execution"
    """Label whose mean the vector points to."""
    balance_correct: bool = False
    """Use as many correct as incorrect traces, the first ones in the order they were given
    (the paper: the first 500 + 500), when the cache says which traces were correct."""
    n_per_class: int | None = None
    """With `balance_correct`: at most this many traces of each class (None: the smaller
    class's size)."""

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be a non-negative int, got {self.layer!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown SEAL variant {self.variant!r}; choose one of "
                             f"{sorted(VARIANTS)}")
        if self.keep in VARIANTS[self.variant]:
            raise ValueError(f"keep={self.keep!r} is also a suppressed label of variant "
                             f"{self.variant!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seal_direction(acts: Float[Tensor, "n d_model"], labels: Sequence[str],
                   variant: str = "both", keep: str = "execution") -> Float[Tensor, "d_model"]:
    """S = mean(acts[label == keep]) - mean(acts[label in suppressed(variant)]).

    The suppressed set is pooled (one mean over all its thoughts, not a mean of per-label means).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown SEAL variant {variant!r}; choose one of {sorted(VARIANTS)}")
    if acts.ndim != 2 or acts.shape[0] != len(labels):
        raise ValueError(f"need one label per activation row: {tuple(acts.shape)} activations, "
                         f"{len(labels)} labels")
    acts = acts.float()
    pos = torch.tensor([lab == keep for lab in labels], dtype=torch.bool)
    neg = torch.tensor([lab in VARIANTS[variant] for lab in labels], dtype=torch.bool)
    for name, m in ((keep, pos), ("+".join(VARIANTS[variant]), neg)):
        if not m.any():
            raise ValueError(f"no '{name}' thoughts among the {len(labels)} cached thoughts: "
                             "SEAL needs both groups; cache more (or more varied) traces")
    return acts[pos].mean(0) - acts[neg].mean(0)


def _balanced_index(cache: Any, n: int | None = None) -> list[int] | None:
    """Thought rows of an equal number of correct and incorrect traces: the first ones of each
    in the order the traces were given (`trace_index`), as the paper's first 500 + 500; cache
    rows themselves are stored longest trace first."""
    correct_by_trace: dict[Any, bool] = {}
    order: dict[Any, int] = {}
    for k, row in enumerate(cache.metadata):
        if row.get("correct") is None:
            return None
        correct_by_trace.setdefault(row["trace_id"], bool(row["correct"]))
        order.setdefault(row["trace_id"], int(row.get("trace_index", k)))
    ranked = sorted(correct_by_trace, key=order.__getitem__)
    right = [t for t in ranked if correct_by_trace[t]]
    wrong = [t for t in ranked if not correct_by_trace[t]]
    n = min(len(right), len(wrong), *([] if n is None else [n]))
    if n == 0:
        return None
    keep = set(right[:n]) | set(wrong[:n])
    return [i for i, row in enumerate(cache.metadata) if row["trace_id"] in keep]


def extract_seal_vector(cache: Any, layer: int | None = None,
                        config: SealConfig | None = None, *, data: Any = None,
                        model: ModelBackend | None = None, read_site: str | None = None,
                        write_site: str | None = None) -> SteeringVector:
    """SEAL vector from a thought cache (`lens_steer.cache.load_cache(dir)` or its path).

    `layer` overrides `config.layer`. The cache's labels decide the groups. Provenance records
    the cache's model, the data description, the date and the config. `read_site`: the cached
    site read (default resid_post of the layer); `write_site`: where the vector is added
    (default resid_post of the layer; e.g. `blocks.20.hook_resid_pre` as the official code).
    """
    from lens_steer.cache import ThoughtCache, load_cache  # noqa: PLC0415
    from lens_steer.steering.vector import provenance  # noqa: PLC0415

    if not isinstance(cache, ThoughtCache):
        cache = load_cache(cache)
    config = config or SealConfig(layer=layer if layer is not None else 20)
    if layer is not None and layer != config.layer:
        config = SealConfig(**{**config.to_dict(), "layer": layer})
    labels = list(cache.labels)
    index = _balanced_index(cache, config.n_per_class) if config.balance_correct else None
    where = config.layer if read_site is None else read_site
    acts = cache.activations(where, index) if index else cache.activations(where)
    if index:
        labels = [labels[i] for i in index]
    direction = seal_direction(acts, labels, config.variant, config.keep)
    counts = {lab: labels.count(lab) for lab in sorted(set(labels))}
    method = "seal" if config.variant == "both" else f"seal:{config.variant}"
    info = getattr(cache, "info", {}) or {}
    if model is not None:
        prov = provenance(model, data, config, thought_counts=counts)
    else:
        model_info = info.get("model", {}) if isinstance(info, dict) else {}
        prov = provenance(model_info.get("model", "unknown") if isinstance(model_info, dict)
                          else model_info, data, config, thought_counts=counts)
        if isinstance(model_info, dict):
            prov["model_info"] = model_info
    if read_site is not None or write_site is not None:
        prov["read_site"] = read_site or f"blocks.{config.layer}.hook_resid_post"
        prov["write_site"] = write_site or f"blocks.{config.layer}.hook_resid_post"
    return SteeringVector(layer=None if write_site else config.layer, site=write_site,
                          vector=direction, method=method,
                          rule="think_delimiter", scale=config.alpha, provenance=prov)


def seal_intervention(model: ModelBackend, vector: SteeringVector, alpha: float | None = None,
                      region: str = "think") -> Intervention:
    """alpha * S at the vector's site, only when the newest token is a delimiter in <think>
    (`region="all"`: every delimiter of the generation, as the official code does for
    QwQ-32B-Preview; "auto": "think" when the tokenizer has a `<think>` token, else "all")."""
    return vector.intervention(model, scale=alpha,
                               rule=think_delimiter_rule(model.tokenizer, region))
