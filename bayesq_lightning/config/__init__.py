"""Run configuration: :class:`BayesQConfig` and its option groups (imports no algorithm)."""

from .groups import (
    AllocationOptions,
    GridOptions,
    PosteriorOptions,
    RoundingOptions,
    ScoringOptions,
)
from .run import BayesQConfig

__all__ = [
    "AllocationOptions",
    "BayesQConfig",
    "GridOptions",
    "PosteriorOptions",
    "RoundingOptions",
    "ScoringOptions",
]
