"""Third-party noise a user cannot act on, silenced only around our own calls to Lightning.

:func:`quiet` is a context manager: inside it, the warnings in :data:`WARNINGS` are ignored and
the records in :data:`TIPS` dropped from Lightning's loggers; on leaving it, the warning filters
and the loggers are as they were. Nothing here changes the user's global configuration.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\).* is deprecated",  # torch, inside Lightning's pytree
    r".*`tensorboardX` has been removed as a dependency",  # the CSVLogger default is fine
    r".*module\(s\) in eval mode.*",  # distillation keeps its student in eval mode on purpose
    r".*torch.jit.script.* is deprecated",  # laplace-torch's dependencies at import
)
"""Messages (regular expressions) of warnings ignored inside :func:`quiet`."""

TIPS = re.compile(r"^💡 Tip: ")
"""Log records dropped inside :func:`quiet`: Lightning's advertisements for its cloud services."""

LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
"""The loggers that write Lightning's ``rank_zero_info`` records."""


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not TIPS.match(str(record.msg))


@contextmanager
def quiet() -> Iterator[None]:
    """Ignore :data:`WARNINGS` and drop :data:`TIPS` for the duration of the block."""
    drop = _DropTips()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    with warnings.catch_warnings():
        for message in WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for logger in loggers:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(drop)


def log_interval(n_batches: int | float, requested: int) -> int:
    """``log_every_n_steps`` for an epoch of ``n_batches``: the requested interval, lowered to the
    epoch's length so every epoch logs at least once (Lightning warns otherwise)."""
    if not isinstance(n_batches, int) or n_batches <= 0:  # inf (iterable) or unknown: as asked
        return requested
    return max(1, min(requested, n_batches))
