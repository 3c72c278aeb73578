"""lens_steer: thought-level interpretability and steering of reasoning language models."""

from lens_steer.backends import load_model
from lens_steer.backends.base import GenerationConfig, GenerationResult, ModelBackend
from lens_steer.interventions import (
    EveryPosition,
    Intervention,
    NewestPosition,
    SteeredSite,
    WhenNewestToken,
)

__all__ = [
    "load_model", "ModelBackend", "GenerationConfig", "GenerationResult", "Intervention",
    "EveryPosition", "NewestPosition", "WhenNewestToken", "SteeredSite",
]
