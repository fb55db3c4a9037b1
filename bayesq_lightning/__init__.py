"""bayesq-lightning: uncertainty-guided Bayesian mixed-precision quantization for Lightning.

The core (``quantize_model``, ``save_quantized`` / ``load_quantized``) needs no Lightning; the
Lightning shells (``BayesQCallback``, ``PosteriorDistillModule``, ``distill``, ``distill_model``,
``restore_quantized``) are imported on first use, so ``import bayesq_lightning``
does not import ``lightning``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .artifact import load_quantized, save_quantized, set_kernel
from .config import (
    AllocationOptions,
    BayesQConfig,
    GridOptions,
    PosteriorOptions,
    RoundingOptions,
    ScoringOptions,
)
from .distillation import DistillConfig
from .hf import install as _install_hf
from .quantize import quantize_model
from .result import BlockResult, LayerResult, QuantizationResult

_install_hf()  # "bayesq" in transformers' quantizer registry, without importing transformers

if TYPE_CHECKING:
    from .lightning import (
        BayesQCallback,
        PosteriorDistillModule,
        distill,
        distill_model,
        restore_quantized,
    )

_LIGHTNING_SHELLS = ("BayesQCallback", "PosteriorDistillModule", "distill", "distill_model",
                     "restore_quantized")

__all__ = [
    "AllocationOptions",
    "BayesQCallback",
    "BayesQConfig",
    "BlockResult",
    "DistillConfig",
    "GridOptions",
    "LayerResult",
    "PosteriorDistillModule",
    "PosteriorOptions",
    "QuantizationResult",
    "RoundingOptions",
    "ScoringOptions",
    "distill",
    "distill_model",
    "load_quantized",
    "quantize_model",
    "restore_quantized",
    "save_quantized",
    "set_kernel",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_SHELLS:
        from . import lightning

        return getattr(lightning, name)
    raise AttributeError(f"module 'bayesq_lightning' has no attribute {name!r}")
