"""The Lightning shells over the core: the callback, distillation, datamodules, reference models,
the CLI.

The core never imports this subpackage; besides it, only :mod:`bayesq_lightning.datasets` (the
fixtures that build on its datamodules) imports ``lightning``.
"""

from .callback import BayesQCallback, EvaluationError, restore_quantized
from .distill import PosteriorDistillModule, distill, distill_model

__all__ = ["BayesQCallback", "EvaluationError", "PosteriorDistillModule", "distill",
           "distill_model", "restore_quantized"]
