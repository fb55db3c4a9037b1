"""The Lightning shells over the core: the callback, datamodules, reference models, the CLI.

Only this subpackage imports ``lightning``.
"""

from .callback import BayesQCallback

__all__ = ["BayesQCallback"]
