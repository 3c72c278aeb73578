"""Steering vectors: SEAL (suppress reflection/transition thoughts), ASC (concise reasoning),
the logits-penalty baseline, and KL-bounded strength calibration. See docs/steering.md."""

from lens_steer.steering.asc import (
    AscConfig,
    Calibration,
    asc_direction,
    asc_intervention,
    calibrate_gamma,
    directional_derivatives,
    extract_asc_vector,
    kl_bound,
    kl_divergence,
    kl_summary,
    measure_kl,
    sample_states,
    select_gamma,
    solve_gamma,
)
from lens_steer.steering.baselines import (
    DEFAULT_TRIGGERS,
    PenaltyConfig,
    trigger_logit_bias,
    trigger_token_ids,
)
from lens_steer.steering.seal import (
    VARIANTS,
    SealConfig,
    extract_seal_vector,
    seal_direction,
    seal_intervention,
)
from lens_steer.steering.vector import SteeringVector, provenance, steer

__all__ = [
    "SteeringVector", "provenance", "steer",
    "SealConfig", "VARIANTS", "seal_direction", "extract_seal_vector", "seal_intervention",
    "AscConfig", "Calibration", "asc_direction", "extract_asc_vector", "asc_intervention",
    "sample_states", "directional_derivatives", "solve_gamma", "calibrate_gamma", "measure_kl",
    "kl_divergence", "kl_bound", "kl_summary", "select_gamma",
    "PenaltyConfig", "DEFAULT_TRIGGERS", "trigger_token_ids", "trigger_logit_bias",
]
