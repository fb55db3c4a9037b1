"""bayesq-lightning: uncertainty-guided Bayesian mixed-precision quantization for Lightning."""

from .callback import BayesQCallback
from .config import BayesQConfig
from .quantize import quantize_model
from .result import BlockResult, LayerResult, QuantizationResult

__all__ = [
    "BayesQCallback",
    "BayesQConfig",
    "BlockResult",
    "LayerResult",
    "QuantizationResult",
    "quantize_model",
]
__version__ = "0.1.0"
