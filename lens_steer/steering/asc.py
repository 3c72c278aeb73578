"""ASC (Azizi et al., 2025, "Activation Steering for Chain-of-Thought Compression"): a
"be concise" direction from paired traces, and its strength from a KL budget.

Extraction. For pairs (verbose CoT, concise CoT) of the same problem,

    v = mean over pairs of ( h_L(problem + concise) - h_L(problem + verbose) )

with h_L the `resid_post` of block L at the last token. The vector is stored as the unit
direction v̂ = v / ‖v‖ (‖v‖ is kept in the provenance), so the strength gamma is in residual
units and the KL bound below applies to it directly.

Application. gamma * v̂ added at layer L at the newest position of every forward step (the
prompt's last token at prefill, then each generated token).

Strength by the KL bound. For a state s (a token prefix) let f(t) = next-token logits of s with
t * v̂ added to layer L's resid_post at the last position. Over a calibration set of states:

- alpha = median_s ‖f'(0)‖       (f'(0) = J v̂: Jacobian-vector product of the logits w.r.t.
  the layer-L residual, along v̂)
- L = 95th percentile_s ‖f''(0)‖  (f''(0) = d²/dt² f(h + t v̂) at t = 0: the Hessian of every
  logit contracted twice with v̂, i.e. the second directional derivative)

Both come from nested forward-mode AD (`torch.func.jvp` of `torch.func.jvp`) through
`ModelBackend.last_logits_given_delta`, under the math SDPA kernel (the fused CPU kernel has no
forward-mode derivative). With Δz = f(t) - f(0) ≈ t·f'(0) + t²/2·f''(0) and the softmax Fisher
matrix's spectral norm ≤ 1/2,

    KL(p_steered ‖ p) ≈ ½ Δzᵀ (diag p - p pᵀ) Δz ≤ ¼ ‖Δz‖² ≤ ¼ (t·alpha + t²·L/2)²

Asking ¼(t·alpha + t²·L/2)² ≤ epsilon is, both terms being positive, t·alpha + t²·L/2 ≤
2·sqrt(epsilon): a quadratic whose positive root is solved exactly,

    gamma = (sqrt(alpha² + 4·L·sqrt(epsilon)) - alpha) / L      (-> 2·sqrt(epsilon)/alpha as L -> 0)

The cubic alpha²t² + alpha·L·t³ = 4·epsilon used before dropped the t⁴·L²/4 term of the square
and overshoots (alpha = 1, L = 100, epsilon = 0.1: 0.156, where the bound is 0.47 > epsilon;
the exact root is 0.103); `Calibration.gamma_cubic` reports it beside the exact value.
`measure_kl` reports the actual KL on held-out states next to epsilon. A fixed gamma
(`AscConfig.gamma`) skips the calibration.

Official code (ArminAzizi98/ASC), reproduced by `load_released_vector` /
`extract_official_vector` / `official_asc_intervention` and the `asc-*` presets: v is the raw mean
of concise - verbose last-token states read at `hidden_states[L]` = `blocks.L.hook_resid_pre`,
and generation *subtracts* gamma·v at the output of decoder layer L = `blocks.L.hook_resid_post`
(fixed gamma 0.27 / 0.46 / 0.5 for R1-Qwen-7B / R1-Llama-8B / QwQ-32B; released norms 249 /
14.5 / 336). `build_pairs` makes (verbose from the model, concise from the user's file) pairs.
This module is over 400 lines because the official variant shares its pieces with ours.

Sign: v points from verbose to concise, so +gamma·v̂ should shorten traces; `lens-steer asc`
measures it (`targets.sign_shortens_traces`). On the first toy checkpoint it did, with no flip;
the shipped toy model never writes the concise style, and there neither sign shortens its
traces (docs/steering.md has the numbers).
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from lens_steer.errors import DataError
from lens_steer.interventions import Intervention, NewestPosition
from lens_steer.steering.vector import SteeringVector, provenance

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend


@dataclass
class AscConfig:
    """How to extract, calibrate and apply an ASC vector."""

    layer: int = 20
    """Block whose resid_post is read and steered."""
    epsilon: float = 1e-3
    """KL budget (nats) per next-token distribution for the calibrated gamma."""
    gamma: float | None = None
    """Fixed strength (residual units along v̂); None = calibrate from epsilon."""
    n_calibration: int = 50
    """States used to estimate alpha (median ‖J v̂‖) and L (quantile of ‖H v̂‖)."""
    n_heldout: int = 50
    """Held-out states on which the KL of the chosen gamma is measured."""
    l_quantile: float = 0.95
    """Quantile of ‖H v̂‖ taken as L."""
    trace_end: str = "think_close"
    """Where the last token of each pair's sequence is: "think_close" (the trace up to, not
    including, `</think>`: the reasoning state) or "full" (the whole completion)."""
    batch_size: int = 16
    """Sequences per forward pass when reading activations."""
    seed: int = 0
    """Seed for choosing calibration / held-out states."""

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be a non-negative int, got {self.layer!r}")
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0 (a KL budget in nats), got {self.epsilon}")
        if self.gamma is not None and not math.isfinite(self.gamma):
            raise ValueError(f"gamma must be finite, got {self.gamma}")
        if self.n_calibration < 1 or self.n_heldout < 0:
            raise ValueError("n_calibration must be >= 1 and n_heldout >= 0")
        if not 0 < self.l_quantile <= 1:
            raise ValueError(f"l_quantile must be in (0, 1], got {self.l_quantile}")
        if self.trace_end not in ("think_close", "full"):
            raise ValueError(f"trace_end must be 'think_close' or 'full', got {self.trace_end!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- extraction ---------------------------------------------------------------------------------
def asc_direction(concise: Float[Tensor, "pairs d_model"], verbose: Float[Tensor, "pairs d_model"]
                  ) -> Float[Tensor, "d_model"]:
    """v = mean over pairs of (concise - verbose); rows of the two tensors are paired."""
    if concise.shape != verbose.shape or concise.ndim != 2:
        raise ValueError(f"need paired (pairs, d_model) activations, got {tuple(concise.shape)} "
                         f"and {tuple(verbose.shape)}")
    if concise.shape[0] == 0:
        raise ValueError("no pairs: ASC needs at least one (verbose, concise) pair")
    return (concise.float() - verbose.float()).mean(0)


def _cut_trace(trace: str, trace_end: str) -> str:
    if trace_end == "think_close" and "</think>" in trace:
        return trace.split("</think>")[0]
    return trace


def last_token_resid(model: ModelBackend, texts: Sequence[tuple[str, str]], layer: int,
                     batch_size: int = 16, site: str | None = None) -> Float[Tensor, "n d_model"]:
    """resid_post of `layer` (or the hook `site`) at the last token of each (prompt,
    completion), encoded apart and concatenated (as generation sees them)."""
    return _last_token_states(model, [model.encode(p) + model.encode(c) for p, c in texts],
                              layer, batch_size, site)


def _last_token_states(model: ModelBackend, seqs: Sequence[list[int]], layer: int,
                       batch_size: int, site: str | None = None) -> Float[Tensor, "n d_model"]:
    """resid_post of `layer` (or the hook `site`) at the last token of each token sequence."""
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = list(seqs[i:i + batch_size])
        last = [[len(s) - 1] for s in chunk]
        out.append(model.capture_resid(chunk, [layer], last)[layer] if site is None
                   else model.capture(chunk, [site], last)[site])
    return torch.cat(out)


def extract_asc_vector(model: ModelBackend, pairs: Sequence[tuple[str, str, str]],
                       config: AscConfig | None = None, *, data: Any = None,
                       read_site: str | None = None, write_site: str | None = None,
                       raw: bool = False) -> SteeringVector:
    """ASC vector from `pairs` of (prompt, verbose completion, concise completion).

    Returns the unit direction v̂ (rule "newest", scale = `config.gamma` or 1 until calibrated);
    the raw ‖v‖ is in `provenance["raw_norm"]`. `read_site` / `write_site` (hook names; default
    resid_post of `config.layer`): where the states are read and where the vector is added
    (the official code: `blocks.L.hook_resid_pre` and `blocks.L.hook_resid_post`); `raw`: keep
    v unnormalised (the official vector; then gamma multiplies v itself).
    """
    config = config or AscConfig()
    model.validate_layers([config.layer])
    if read_site is not None or write_site is not None:
        model.validate_sites([s for s in (read_site, write_site) if s is not None])
    verbose = last_token_resid(model, [(p, _cut_trace(v, config.trace_end)) for p, v, _ in pairs],
                               config.layer, config.batch_size, site=read_site)
    concise = last_token_resid(model, [(p, _cut_trace(c, config.trace_end)) for p, _, c in pairs],
                               config.layer, config.batch_size, site=read_site)
    v = asc_direction(concise, verbose)
    norm = float(v.norm())
    if norm == 0:
        raise ValueError("concise and verbose activations are identical: no ASC direction")
    sites = ({} if read_site is None and write_site is None else
             {"read_site": read_site or f"blocks.{config.layer}.hook_resid_post",
              "write_site": write_site or f"blocks.{config.layer}.hook_resid_post"})
    prov = provenance(model, data, config, n_pairs=len(pairs), raw_norm=norm,
                      verbose_norm_mean=float(verbose.norm(dim=-1).mean()),
                      **sites, **({"normalised": False} if raw else {}))
    return SteeringVector(layer=None if write_site else config.layer, site=write_site,
                          vector=v if raw else v / norm, method="asc", rule="newest",
                          scale=1.0 if config.gamma is None else config.gamma, provenance=prov)


def asc_intervention(model: ModelBackend, vector: SteeringVector, gamma: float | None = None
                     ) -> Intervention:
    """gamma * v̂ at the vector's layer on the newest position of every forward step."""
    return vector.intervention(model, scale=gamma, rule="newest")


# -- calibration --------------------------------------------------------------------------------
def sample_states(model: ModelBackend, texts: Sequence[tuple[str, str]], n: int, seed: int = 0,
                  min_new: int = 1) -> list[list[int]]:
    """`n` states: prompt + a random-length prefix (≥ `min_new` tokens) of a completion.

    Each text gives at most one state (cycling when n > len(texts)); seeded, deterministic.
    """
    if not texts:
        raise ValueError("no texts to sample calibration states from")
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    states = []
    for k in range(n):
        prompt, completion = texts[order[k % len(order)]]
        p, c = model.encode(prompt), model.encode(completion)
        cut = rng.randint(min(min_new, len(c)), len(c)) if c else 0
        states.append(p + c[:cut])
    return states


def directional_derivatives(model: ModelBackend, state: Sequence[int], layer: int | str,
                            direction: Float[Tensor, "d_model"]
                            ) -> tuple[Float[Tensor, "vocab"], Float[Tensor, "vocab"],
                                       Float[Tensor, "vocab"]]:
    """(f(0), f'(0), f''(0)) for f(t) = next-token logits of `state` with t·direction added to
    layer `layer`'s resid_post (or the site `layer` names) at the last position: the logits, J·d and d²/dt² f(h + t d).

    Nested forward-mode AD, exact up to float error; uses the math SDPA kernel.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    d = direction.to(model.device, torch.float32)
    one = torch.ones((), device=model.device)

    def f(t: Tensor) -> Tensor:
        return model.last_logits_given_delta(state, layer, (t * d).to(model.dtype)).float()

    def f_and_df(t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.func.jvp(f, (t,), (one,))

    with sdpa_kernel([SDPBackend.MATH]):
        (y, dy), (_, d2y) = torch.func.jvp(f_and_df, (torch.zeros((), device=model.device),),
                                           (one,))
    return y.detach().cpu(), dy.detach().cpu(), d2y.detach().cpu()


def solve_gamma(alpha: float, L: float, epsilon: float) -> float:
    """The largest gamma with ¼(gamma·alpha + gamma²·L/2)² ≤ epsilon, exactly:
    (sqrt(alpha² + 4·L·sqrt(epsilon)) - alpha) / L, or 2·sqrt(epsilon)/alpha when L = 0."""
    _check_bound_args(alpha, L, epsilon)
    if L == 0:
        return 2 * math.sqrt(epsilon) / alpha
    root = 2 * math.sqrt(epsilon)
    # (sqrt(a² + 2Lr) - a) / L, written without cancellation for small L
    return 2 * root / (math.sqrt(alpha * alpha + 2 * L * root) + alpha)


def solve_gamma_cubic(alpha: float, L: float, epsilon: float) -> float:
    """The earlier approximation: positive root of alpha²γ² + alpha·L·γ³ = 4·epsilon (the bound's
    square without its γ⁴ term); kept only to be reported beside `solve_gamma`."""
    _check_bound_args(alpha, L, epsilon)
    if L == 0:
        return 2 * math.sqrt(epsilon) / alpha
    c = 4 * epsilon * L * L / alpha ** 4
    # x³ + x² = c is increasing for x > 0: Newton from a bracket-safe start, then polish
    x = min(math.sqrt(c), c ** (1 / 3))
    for _ in range(100):
        fx = x ** 3 + x ** 2 - c
        step = fx / (3 * x * x + 2 * x)
        x = max(x - step, x / 2)
        if abs(step) <= 1e-15 * max(x, 1e-300):
            break
    return alpha * x / L


def _check_bound_args(alpha: float, L: float, epsilon: float) -> None:
    if not alpha > 0:
        raise ValueError(f"alpha = median ‖J v̂‖ must be > 0, got {alpha}: the direction does "
                         "not move the logits at this layer")
    if not (L >= 0 and epsilon > 0 and math.isfinite(L) and math.isfinite(epsilon)):
        raise ValueError(f"need finite L >= 0 and epsilon > 0, got L={L}, epsilon={epsilon}")


def kl_divergence(steered_logits: Float[Tensor, "... vocab"], base_logits: Float[Tensor, "... vocab"]
                  ) -> Float[Tensor, "..."]:
    """KL(p_steered ‖ p_base) of the next-token distributions, in nats."""
    lp = torch.log_softmax(steered_logits.double(), -1)
    lq = torch.log_softmax(base_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).float()


def kl_bound(gamma: float, jv_norm: float, hv_norm: float) -> float:
    """Second-order bound ¼(γ‖J v̂‖ + γ²/2‖H v̂‖)² on the KL of one state."""
    return 0.25 * (gamma * jv_norm + 0.5 * gamma ** 2 * hv_norm) ** 2


@dataclass
class Calibration:
    """Result of `calibrate_gamma`."""

    gamma: float
    alpha: float
    """median ‖J v̂‖ over the calibration states."""
    L: float
    """`l_quantile` quantile of ‖H v̂‖ over the calibration states."""
    epsilon: float
    x: float
    """gamma·L/alpha (the bound's two terms' ratio ×2)."""
    gamma_cubic: float = 0.0
    """What the cubic approximation gave (larger: it drops the γ⁴ term); for comparison."""
    jv_norms: list[float] = field(default_factory=list)
    hv_norms: list[float] = field(default_factory=list)
    n_states: int = 0
    seconds_per_state: float = 0.0
    kl_at_calibration: list[float] = field(default_factory=list)
    """Measured KL(p_steered ‖ p) at each calibration state with this gamma."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantile(values: Sequence[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def calibrate_gamma(model: ModelBackend, vector: SteeringVector, states: Sequence[Sequence[int]],
                    epsilon: float = 1e-3, l_quantile: float = 0.95, measure: bool = True
                    ) -> Calibration:
    """gamma from the KL bound (module docstring) over `states` (token id lists)."""
    vector.check_compatible(model)
    if not states:
        raise ValueError("no calibration states")
    direction = vector.unit()
    jv, hv, base = [], [], []
    t0 = time.perf_counter()
    for s in states:
        y, dy, d2y = directional_derivatives(model, s, vector.site, direction)
        jv.append(float(dy.norm()))
        hv.append(float(d2y.norm()))
        base.append(y)
    per_state = (time.perf_counter() - t0) / len(states)
    alpha = float(statistics.median(jv))
    L = _quantile(hv, l_quantile)
    gamma = solve_gamma(alpha, L, epsilon)
    x = gamma * L / alpha
    cal = Calibration(gamma=gamma, alpha=alpha, L=L, epsilon=epsilon, x=x,
                      gamma_cubic=solve_gamma_cubic(alpha, L, epsilon), jv_norms=jv,
                      hv_norms=hv, n_states=len(states), seconds_per_state=per_state)
    if measure:
        cal.kl_at_calibration = measure_kl(model, vector, gamma, states, base_logits=base)
    return cal


@torch.no_grad()
def measure_kl(model: ModelBackend, vector: SteeringVector, gamma: float,
               states: Sequence[Sequence[int]],
               base_logits: Sequence[Tensor] | None = None) -> list[float]:
    """KL(p_steered ‖ p) of the next token at each state with gamma·v̂ at the vector's layer."""
    direction = vector.unit().to(model.device, model.dtype)
    zero = torch.zeros_like(direction)
    out = []
    for i, s in enumerate(states):
        base = (base_logits[i] if base_logits is not None
                else model.last_logits_given_delta(s, vector.site, zero).float().cpu())
        steered = model.last_logits_given_delta(s, vector.site, gamma * direction).float().cpu()
        out.append(float(kl_divergence(steered, base)))
    return out


def kl_summary(kls: Sequence[float], epsilon: float) -> dict[str, float]:
    """mean / median / 95th percentile / max KL and the share of states within epsilon."""
    if not kls:
        return {}
    return {"epsilon": epsilon, "mean": float(statistics.fmean(kls)),
            "median": float(statistics.median(kls)), "p95": _quantile(kls, 0.95),
            "max": float(max(kls)), "frac_within_epsilon": sum(k <= epsilon for k in kls) / len(kls),
            "n": len(kls)}


def select_gamma(base: dict[str, float], grid: dict[float, dict[str, float]],
                 max_accuracy_drop_points: float = 1.0) -> float | None:
    """The grid gamma with the shortest traces whose accuracy stays within
    `max_accuracy_drop_points` of `base`; None when no gamma qualifies.

    `base` and each `grid[gamma]` hold `accuracy` (fraction) and `mean_tokens`, measured on a
    validation split: choosing on the evaluation split would tune the evaluation.
    """
    ok = {g: s for g, s in grid.items()
          if 100 * (s["accuracy"] - base["accuracy"]) >= -max_accuracy_drop_points}
    return min(ok, key=lambda g: (ok[g]["mean_tokens"], g)) if ok else None


def gamma_for_measured_kl(model: ModelBackend, vector: SteeringVector, states: Sequence[Sequence[int]],
                          epsilon: float, quantile: float = 0.5, hi: float = 1e3,
                          iters: int = 30) -> float:
    """The largest gamma whose *measured* KL (the `quantile` over `states`) stays ≤ epsilon,
    by bisection on [0, hi]: what the bound approximates, without its worst-case Fisher factor.
    On the toy it is far closer to a useful strength than the bound (docs/steering.md)."""
    def q(g: float) -> float:
        return _quantile(measure_kl(model, vector, g, states), quantile)

    lo = 0.0
    if q(hi) <= epsilon:
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if q(mid) <= epsilon else (lo, mid)
    return lo


# -- the official code's format and hook (ArminAzizi98/ASC) -------------------------------------
OFFICIAL_SIGN = -1.0
"""generate.py subtracts gamma·v (v = concise - verbose) at the output of decoder layer L."""


def load_released_vector(path: str | os.PathLike, layer: int, gamma: float, *,
                         d_model: int | None = None, model_name: str | None = None
                         ) -> SteeringVector:
    """A released ASC `.pt` file (the per-pair differences, (n_pairs, d_model), fp16 or fp32)
    as the official hook uses it: the mean over pairs, raw (not normalised), applied as
    -gamma·v at `blocks.{layer}.hook_resid_post` on the newest position of every forward step.

    Loaded with `torch.load(weights_only=True)` (no code runs from the pickle); the content must
    be one floating tensor of 1 or 2 dimensions with `d_model` columns when given.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"no ASC vector file at {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the pickle may hold anything
        raise DataError(f"{p}: not a tensor file loadable with weights_only=True ({e}); "
                        "released ASC vectors are plain torch.save'd tensors") from e
    if not isinstance(obj, Tensor):
        raise DataError(f"{p}: holds a {type(obj).__name__}, expected a tensor "
                        "(n_pairs, d_model) of per-pair differences")
    if obj.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise DataError(f"{p}: dtype {obj.dtype}, expected a floating tensor")
    if obj.ndim not in (1, 2) or obj.shape[-1] == 0 or (obj.ndim == 2 and obj.shape[0] == 0):
        raise DataError(f"{p}: shape {tuple(obj.shape)}, expected (n_pairs, d_model) or "
                        "(d_model,)")
    if d_model is not None and obj.shape[-1] != d_model:
        raise DataError(f"{p}: vectors have {obj.shape[-1]} dimensions but the model's d_model "
                        f"is {d_model}: use the file released for this model")
    if not torch.isfinite(obj).all():
        raise DataError(f"{p}: holds NaN/inf")
    v = obj.float().mean(0) if obj.ndim == 2 else obj.float()
    prov = {"model": model_name, "source": str(p), "format": "asc-release",
            "n_pairs": int(obj.shape[0]) if obj.ndim == 2 else None,
            "file_dtype": str(obj.dtype).removeprefix("torch."), "raw_norm": float(v.norm()),
            "read_site": f"blocks.{layer}.hook_resid_pre",
            "write_site": f"blocks.{layer}.hook_resid_post", "sign": OFFICIAL_SIGN,
            "gamma": float(gamma)}
    return SteeringVector(layer=layer, site=f"blocks.{layer}.hook_resid_post", vector=v,
                          method="asc-official", rule="newest",
                          scale=OFFICIAL_SIGN * float(gamma), provenance=prov)


def official_asc_intervention(vector: SteeringVector, gamma: float | None = None
                              ) -> Intervention:
    """-gamma·v at `blocks.{layer}.hook_resid_post` (= output of `model.layers[layer]`) on the
    newest position of every step, as the official forward hook edits `output[0][:, -1, :]`."""
    scale = vector.scale if gamma is None else OFFICIAL_SIGN * float(gamma)
    return Intervention(site=f"blocks.{vector.layer}.hook_resid_post", vector=vector.vector,
                        rule=NewestPosition(), scale=scale)


def extract_official_vector(model: ModelBackend, pairs: Sequence[tuple[str, str, str]], layer: int,
                            gamma: float, *, bos: bool = False, batch_size: int = 8
                            ) -> SteeringVector:
    """ASC's extract_steering_vector.py: mean over pairs of the last-token state at
    `hidden_states[layer]` (= `blocks.{layer}.hook_resid_pre`) of problem + concise minus that
    of problem + verbose, each pair's strings concatenated before tokenisation (`bos`: prepend
    the tokenizer's BOS, as R1 tokenizers do by default). Raw, for `official_asc_intervention`.
    """
    site = f"blocks.{layer}.hook_resid_pre"
    bos_id = getattr(model.tokenizer, "bos_token_id", None) if bos else None

    def states(texts: list[str]) -> Tensor:
        seqs = [([bos_id] if bos_id is not None else []) + model.encode(t) for t in texts]
        return _last_token_states(model, seqs, layer, batch_size, site)

    concise = states([p + c for p, _, c in pairs])
    verbose = states([p + v for p, v, _ in pairs])
    diffs = concise.float() - verbose.float()
    v = diffs.mean(0)
    prov = provenance(model, None, None, format="asc-official", n_pairs=len(pairs),
                      raw_norm=float(v.norm()), read_site=site,
                      write_site=f"blocks.{layer}.hook_resid_post", sign=OFFICIAL_SIGN,
                      gamma=float(gamma))
    return SteeringVector(layer=layer, site=f"blocks.{layer}.hook_resid_post", vector=v,
                          method="asc-official", rule="newest",
                          scale=OFFICIAL_SIGN * float(gamma), provenance=prov)


def save_released_format(path: str | os.PathLike, diffs: Float[Tensor, "pairs d_model"]
                         ) -> Path:
    """Write per-pair differences as the official code does (`torch.save` of one tensor)."""
    torch.save(diffs.detach().cpu(), Path(path))
    return Path(path)


# -- pairs ----------------------------------------------------------------------------------------
ASC_VERBOSE_SUFFIX = " Let's think step by step.\n"
"""generate_long_cots.py appends this to each problem before sampling the verbose CoT."""


def read_concise_answers(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(problem, concise answer) pairs from the user's file: JSON list (the official
    short_cots.json) or JSONL, each object with "problem" and "answer"."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    try:
        rows = (json.loads(text) if text.lstrip().startswith("[")
                else [json.loads(line) for line in text.splitlines() if line.strip()])
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg}); expected a JSON list or "
                        'JSONL of {"problem": ..., "answer": ...}') from e
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not {"problem", "answer"} <= set(row):
            raise DataError(f"{p} item {i + 1}: needs 'problem' and 'answer' (the concise "
                            "solution)")
        out.append((str(row["problem"]), str(row["answer"])))
    if not out:
        raise DataError(f"{p}: no concise answers")
    return out


def build_pairs(model: ModelBackend, concise: Sequence[tuple[str, str]], config: Any = None, *,
                suffix: str = ASC_VERBOSE_SUFFIX, official_text: bool = True
                ) -> list[tuple[str, str, str]]:
    """(prompt, verbose, concise) triples: the verbose CoT generated by the target `model` for
    problem + `suffix` (official: temperature 0.3, repetition penalty 1.2, 4,096 new tokens;
    pass that `GenerationConfig`), the concise one from the user's file.

    `official_text`: the verbose text is the prompt followed by the completion, as the official
    pipeline's `generated_text` (which echoes the prompt), so the state is read after
    problem + problem + suffix + completion. False: problem + completion only.
    """
    prompts = [prob + suffix for prob, _ in concise]
    result = model.generate(prompts, config)
    out = []
    for (prob, short), prompt, completion in zip(concise, prompts, result.texts, strict=True):
        verbose = prompt + completion if official_text else completion
        out.append((prob, verbose, short))
    return out
