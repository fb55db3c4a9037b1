"""bayesq-lightning: uncertainty-guided Bayesian mixed-precision quantization for Lightning."""

from .callback import BayesQCallback
from .config import BayesQConfig
from .export import load_quantized, save_quantized
from .quantize import quantize_model
from .result import BlockResult, LayerResult, QuantizationResult

__all__ = [
    "BayesQCallback",
    "BayesQConfig",
    "BlockResult",
    "LayerResult",
    "QuantizationResult",
    "load_quantized",
    "quantize_model",
    "save_quantized",
]
__version__ = "0.1.0"
