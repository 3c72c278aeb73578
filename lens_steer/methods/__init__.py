"""Efficient-reasoning methods behind one protocol (`core`: base, penalty, seal, asc, cod;
`phased`: DEER, budget forcing), all registered in `STEERING_METHODS`; see `core`'s docstring."""

from lens_steer.methods.core import (  # noqa: F401
    COD_INSTRUCTION,
    END_THINK,
    Asc,
    BaseMethod,
    ChainOfDraft,
    Method,
    MethodResult,
    Penalty,
    Seal,
    TokenCount,
    evaluate_method,
    thinking_split,
)
from lens_steer.methods.phased import BudgetForcing, Deer  # noqa: F401
