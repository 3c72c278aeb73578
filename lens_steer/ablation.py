"""Component ablation: which attention / MLP outputs (or heads) the model's thought structure
needs.

A *condition* names one component of one block: its attention output
(`blocks.L.hook_attn_out`), its MLP output (`blocks.L.hook_mlp_out`) or one attention head
(`blocks.L.attn.hook_z`, `head=h`, i.e. the head's value-weighted sum before the output
projection). `ablation_intervention` turns it into an `Intervention` that sets the component to
zero, or to its mean over the model's own traces (`site_means`), at every position (prompt and
generation) or at generated positions only; generation with it goes through the one evaluation
path (`lens_steer.eval.runner.run_eval`).

    conds = ablation_conditions(model.n_layers, components=("attn", "mlp"))
    iv = ablation_intervention(conds[0])                     # zero-ablate blocks.0.hook_attn_out
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jaxtyping import Float
from torch import Tensor

from lens_steer.errors import ConfigError
from lens_steer.interventions import EveryPosition, Intervention, NewestPosition, PositionRule

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend

COMPONENTS: dict[str, str] = {"attn": "hook_attn_out", "mlp": "hook_mlp_out"}
"""Ablatable block outputs by short name (heads: `head` conditions on `attn.hook_z`)."""
MODES = ("zero", "mean")
POSITIONS: dict[str, type[PositionRule]] = {"every": EveryPosition, "generated": NewestPosition}
"""Where the ablation applies: every position (prompt and generation), or the newest position
of each step (the last prompt token, then every generated token)."""


@dataclass(frozen=True)
class Condition:
    """One ablated component: `component` "attn", "mlp" or "head" (then `head` is set)."""

    layer: int
    component: str
    head: int | None = None

    @property
    def site(self) -> str:
        if self.component == "head":
            return f"blocks.{self.layer}.attn.hook_z"
        return f"blocks.{self.layer}.{COMPONENTS[self.component]}"

    @property
    def name(self) -> str:
        """Short, file-name safe: `L2-attn`, `L0-mlp`, `L3-h1`."""
        part = f"h{self.head}" if self.component == "head" else self.component
        return f"L{self.layer}-{part}"


def ablation_conditions(n_layers: int, layers: Sequence[int] | None = None,
                        components: Sequence[str] = ("attn", "mlp"), n_heads: int = 0
                        ) -> list[Condition]:
    """Every (layer, component) in `layers` (default all), then every head when `n_heads`."""
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ConfigError(f"layer {bad[0]}: this model has layers 0..{n_layers - 1}")
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ConfigError(f"unknown component {unknown[0]!r}; choose from {list(COMPONENTS)} "
                          "(heads: ask for them with heads=True / --heads)")
    out = [Condition(layer, c) for layer in layers for c in components]
    return out + [Condition(layer, "head", h) for layer in layers for h in range(n_heads)]


def ablation_intervention(cond: Condition, mode: str = "zero",
                          means: dict[str, Tensor] | None = None, positions: str = "every"
                          ) -> Intervention:
    """The `Intervention` that ablates `cond`: zero, or the site's mean from `means`
    (`site_means`; per head, that head's (d_head,) mean)."""
    if positions not in POSITIONS:
        raise ConfigError(f"unknown positions {positions!r}; choose from {list(POSITIONS)}")
    rule = POSITIONS[positions]()
    if mode == "zero":
        return Intervention.zero_ablate(cond.site, rule=rule, head=cond.head)
    if mode != "mean":
        raise ConfigError(f"unknown ablation mode {mode!r}; choose from {list(MODES)}")
    if not means or cond.site not in means:
        raise ConfigError(f"mean ablation of {cond.site} needs its mean: compute it with "
                          "site_means(model, traces, sites)")
    mean = means[cond.site]
    return Intervention.mean_ablate(cond.site, mean if cond.head is None else mean[cond.head],
                                    rule=rule, head=cond.head)


def site_means(model: ModelBackend, sequences: Sequence[Sequence[int]], sites: Sequence[str],
               batch_size: int = 8) -> dict[str, Float[Tensor, "..."]]:
    """Mean activation of each site over every real position of `sequences` (token ids, e.g.
    the model's own traces on the extraction split): (d_model,), or (n_heads, d_head) for
    `attn.hook_z`. Accumulated per batch, so memory does not grow with the data."""
    if not sequences:
        raise ConfigError("site_means needs at least one sequence")
    sums: dict[str, Tensor] = {}
    count = 0
    for i in range(0, len(sequences), batch_size):
        batch = [list(s) for s in sequences[i:i + batch_size]]
        got = model.capture(batch, list(sites), [range(len(s)) for s in batch])
        for site, x in got.items():
            sums[site] = sums.get(site, 0) + x.double().sum(0)
        count += sum(len(s) for s in batch)
    return {site: (s / count).float() for site, s in sums.items()}


def deltas(base: dict, ablated: dict) -> dict[str, float | None]:
    """Ablated minus base: accuracy points, mean tokens, reflection / transition per trace."""
    def per(s: dict, k: str) -> float:
        return float((s.get("thoughts_per_trace") or {}).get(k) or 0.0)

    out = {"accuracy_points": 100.0 * (ablated["accuracy"] - base["accuracy"]),
           "mean_tokens": ablated["mean_tokens"] - base["mean_tokens"]}
    for k in ("reflection", "transition"):
        out[f"{k}_per_trace"] = per(ablated, k) - per(base, k)
    return out


def summary_row(cond: Condition | None, summary: dict) -> dict:
    """One table row: what was ablated and the headline metrics of its evaluation."""
    t = summary.get("thoughts_per_trace") or {}
    return {"condition": "base" if cond is None else cond.name,
            "layer": None if cond is None else cond.layer,
            "component": "none" if cond is None else cond.component,
            "head": None if cond is None else cond.head,
            "accuracy": float(summary["accuracy"]), "mean_tokens": float(summary["mean_tokens"]),
            "reflection_per_trace": float(t.get("reflection") or 0.0),
            "transition_per_trace": float(t.get("transition") or 0.0),
            "execution_per_trace": float(t.get("execution") or 0.0),
            "unfinished_share": summary.get("unfinished_share")}

