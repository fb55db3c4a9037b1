"""The Lightning shells over the core: the callback, datamodules, reference models, the CLI.

Only this subpackage imports ``lightning``.
"""

from .callback import BayesQCallback, restore_quantized
from .distill import PosteriorDistillModule, distill, distill_model

__all__ = ["BayesQCallback", "PosteriorDistillModule", "distill", "distill_model",
           "restore_quantized"]
