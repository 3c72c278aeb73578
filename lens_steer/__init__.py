"""lens_steer: thought-level interpretability and steering of reasoning language models."""

from lens_steer.backends import load_model
from lens_steer.backends.base import DecodeState, GenerationConfig, GenerationResult, ModelBackend
from lens_steer.interventions import (
    AtPositions,
    EveryPosition,
    Intervention,
    NewestPosition,
    SteeredSite,
    WhenNewestToken,
)
from lens_steer.sites import Site, all_sites, parse_site

__all__ = [
    "load_model", "ModelBackend", "GenerationConfig", "GenerationResult", "DecodeState",
    "Intervention", "EveryPosition", "NewestPosition", "WhenNewestToken", "AtPositions",
    "SteeredSite", "Site", "parse_site", "all_sites",
]
