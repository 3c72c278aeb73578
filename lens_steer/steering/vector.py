"""`SteeringVector`: one direction at one site, with where it came from, saved as
safetensors + JSON, applied through the backend's `Intervention`s.

    vec = SteeringVector(layer=4, vector=S, method="seal", provenance=provenance(model, ...))
    vec.save("runs/seal/vector")                 # vector.safetensors + vector.json
    vec = SteeringVector.load("runs/seal/vector")
    model.generate(prompts, cfg, interventions=[vec.intervention(model)])   # as an argument
    with vec.apply(model):                                                 # as a context
        model.generate(prompts, cfg)       # and capture / logits / calibration forwards too

`site` is a TransformerLens hook name (`lens_steer.sites`); `layer` is the site's block. Vectors
saved before sites existed load with `blocks.{layer}.hook_resid_post`, what they meant.

The position rule travels with the vector (`rule`): "every" (all positions), "newest" (prefill's
last token, then each generated token; ASC) or "think_delimiter" (the newest token is a `\\n\\n`
delimiter inside `<think>`; SEAL). With the KV cache every position is steered at most once; the
generation's `GenerationResult.steered` lists exactly which were.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from lens_steer.errors import ConfigError
from lens_steer.interventions import (
    Intervention,
    PositionRule,
    WhenNewestToken,
)
from lens_steer.io import load_tensors, read_json, save_tensors, write_json
from lens_steer.registry import POSITION_RULES
from lens_steer.sites import parse_site, resid_post

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend

RULES = ("every", "newest", "think_delimiter")
FORMAT_VERSION = 2


@dataclass
class SteeringVector:
    """A steering direction added at `site` (default `resid_post` of block `layer`), and its
    provenance."""

    layer: int | None = None
    """Block of the site (kept for old callers; derived from `site` when that is given)."""
    vector: Float[Tensor, "d_model"] = None  # type: ignore[assignment]
    """The direction (not normalised: SEAL's S and ASC's v keep their natural scale)."""
    method: str = ""
    """How it was made, e.g. "seal", "seal:reflection", "asc"."""
    rule: str = "newest"
    """Default position rule: "every", "newest" or "think_delimiter" (SEAL)."""
    scale: float = 1.0
    """Default strength (SEAL's alpha, ASC's calibrated gamma); `intervention(scale=)` overrides."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Where it came from: model, data, date, config (see `provenance`)."""
    site: str | None = None
    """TransformerLens hook name the vector is added to, e.g. "blocks.20.hook_resid_pre"
    (None: `blocks.{layer}.hook_resid_post`)."""

    def __post_init__(self) -> None:
        if self.vector is None:
            raise ConfigError("a steering vector needs its vector")
        if self.site is None:
            if not isinstance(self.layer, int) or self.layer < 0:
                raise ConfigError(f"layer must be a non-negative int, got {self.layer!r}")
            self.site = resid_post(self.layer)
        else:
            parsed = parse_site(self.site)
            if not parsed.editable or parsed.per_head or parsed.layer is None:
                raise ConfigError(f"a steering vector is added at a block's residual/attention/"
                                 f"MLP site, not {parsed.name}")
            if self.layer is not None and self.layer != parsed.layer:
                raise ConfigError(f"layer={self.layer} disagrees with site {parsed.name!r}")
            self.site, self.layer = parsed.name, parsed.layer
        if not isinstance(self.vector, Tensor):
            self.vector = torch.as_tensor(self.vector)
        self.vector = self.vector.detach().float().cpu()
        if self.vector.ndim != 1:
            raise ConfigError(f"a steering vector is 1-D (d_model,), got shape "
                             f"{tuple(self.vector.shape)}")
        if not torch.isfinite(self.vector).all():
            raise ConfigError("steering vector holds NaN/inf: check the activations it was "
                             "extracted from")
        if not math.isfinite(self.scale):
            raise ConfigError(f"scale must be finite, got {self.scale!r}")
        if self.rule not in RULES:
            raise ConfigError(f"unknown rule {self.rule!r}; choose one of {RULES}")

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    def unit(self) -> Float[Tensor, "d_model"]:
        """The direction with norm 1."""
        n = self.vector.norm()
        if n == 0:
            raise ConfigError("zero steering vector has no direction")
        return self.vector / n

    # -- compatibility -------------------------------------------------------------------------
    def check_compatible(self, model: ModelBackend) -> None:
        """Refuse a model with another d_model or too few layers, naming the mismatch."""
        d, n = int(model.d_model), int(model.n_layers)
        src = self.provenance.get("model", "an unknown model")
        if d != self.d_model:
            raise ConfigError(
                f"steering vector has d_model {self.d_model} (from {src}) but the model "
                f"{getattr(model, 'source', '?')} has d_model {d}: extract the vector from this "
                "model (or one with the same residual width)")
        if self.layer >= n:
            raise ConfigError(
                f"steering vector is for layer {self.layer} but the model has layers 0..{n - 1}: "
                "extract it at a layer this model has")

    # -- application ---------------------------------------------------------------------------
    def position_rule(self, model: ModelBackend, rule: str | PositionRule | None = None) -> PositionRule:
        rule = self.rule if rule is None else rule
        if isinstance(rule, PositionRule):
            return rule
        if rule in ("every", "newest"):
            return POSITION_RULES.get(rule)()
        if rule == "think_delimiter":
            return think_delimiter_rule(model.tokenizer)
        raise ConfigError(f"unknown rule {rule!r}; choose one of {RULES} or pass a PositionRule")

    def intervention(self, model: ModelBackend, scale: float | None = None,
                     rule: str | PositionRule | None = None) -> Intervention:
        """The `Intervention` adding `scale * vector` (default `self.scale`) under the rule."""
        self.check_compatible(model)
        return Intervention(site=self.site, vector=self.vector,
                            rule=self.position_rule(model, rule),
                            scale=self.scale if scale is None else float(scale))

    @contextmanager
    def apply(self, model: ModelBackend, scale: float | None = None,
              rule: str | PositionRule | None = None) -> Iterator[Intervention]:
        """Within the block, every forward of `model` also applies this vector (see `steer`)."""
        with steer(model, self.intervention(model, scale, rule)) as ivs:
            yield ivs[0]

    # -- I/O --------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "layer": self.layer, "site": self.site,
                "method": self.method,
                "rule": self.rule, "scale": self.scale, "d_model": self.d_model,
                "norm": self.norm, "provenance": self.provenance}

    def save(self, path: str | os.PathLike) -> Path:
        """Write `<stem>.safetensors` (the tensor) and `<stem>.json` (everything else)."""
        stem = _stem(path)
        meta = self.to_json()
        save_tensors(stem.with_suffix(".safetensors"), {"vector": self.vector},
                     metadata={"steering_vector": json.dumps(meta, default=str)})
        write_json(stem.with_suffix(".json"), meta)
        return stem.with_suffix(".safetensors")

    @classmethod
    def load(cls, path: str | os.PathLike) -> SteeringVector:
        """Read a vector written by `save` (pass the stem, the .safetensors or the .json)."""
        stem = _stem(path)
        tensor_file, json_file = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
        if not tensor_file.exists():
            raise FileNotFoundError(f"no steering vector at {tensor_file}")
        if json_file.exists():
            meta = read_json(json_file)
        else:  # the JSON also lives in the safetensors header
            from safetensors import safe_open  # noqa: PLC0415

            with safe_open(str(tensor_file), "pt") as f:
                meta = json.loads((f.metadata() or {})["steering_vector"])
        vector = load_tensors(tensor_file)["vector"]
        if meta.get("d_model", vector.shape[0]) != vector.shape[0]:
            raise ValueError(f"{json_file} says d_model {meta['d_model']} but "
                             f"{tensor_file} holds {vector.shape[0]} values: the pair is mixed up")
        # format 1 had no site: its vectors were added to resid_post of their layer
        return cls(layer=int(meta["layer"]), vector=vector, method=meta["method"],
                   rule=meta.get("rule", "newest"), scale=float(meta.get("scale", 1.0)),
                   provenance=meta.get("provenance", {}),
                   site=meta.get("site") or resid_post(int(meta["layer"])))


def think_delimiter_rule(tokenizer: Any, region: str = "think") -> WhenNewestToken:
    """SEAL's rule: the newest token is a `\\n\\n` delimiter inside the think region
    (`region`: "think", "all" or "auto", see `lens_steer.thoughts.think_region_predicate`)."""
    from lens_steer.thoughts import think_region_predicate  # noqa: PLC0415

    return WhenNewestToken(think_region_predicate(tokenizer, region),
                           name="think_delimiter" if region == "think"
                           else f"think_delimiter:{region}")


def _stem(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".safetensors", ".json") else p


def provenance(model: Any, data: Any, config: Any = None, **extra: Any) -> dict[str, Any]:
    """Provenance block: model (`describe()`), data description, UTC date, config."""
    from dataclasses import asdict, is_dataclass  # noqa: PLC0415

    if is_dataclass(config) and not isinstance(config, type):
        config = asdict(config)
    described = model.describe() if hasattr(model, "describe") else {"model": str(model)}
    return {"model": described.get("model"), "model_info": described, "data": data,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "config": config, **extra}


@contextmanager
def steer(model: ModelBackend, *items: Intervention | SteeringVector | Sequence[Intervention]
          ) -> Iterator[list[Intervention]]:
    """Within the block, every forward of `model` (generate, capture, logits, calibration)
    also applies these interventions: `model.intervening(...)`, which keeps a per-context stack
    on the backend (blocks nest, inner ones after outer ones; removed on exit or exception; the
    instance's methods are never replaced). Interventions passed to `generate` explicitly are
    applied too.
    """
    ivs: list[Intervention] = []
    for item in items:
        if isinstance(item, SteeringVector):
            ivs.append(item.intervention(model))
        elif isinstance(item, Intervention):
            ivs.append(item)
        else:
            ivs.extend(item)
    with model.intervening(ivs):
        yield ivs
