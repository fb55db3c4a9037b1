"""Progress bars on a terminal (or in Jupyter) only: logs and CI output get no bar noise."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


def on_terminal() -> bool:
    """Whether a bar is worth drawing: standard error is an interactive terminal, or this is a
    Jupyter kernel (``tqdm.auto`` draws a widget there)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)()) or "ipykernel" in sys.modules


def progress(items: Iterable, enabled: bool, desc: str) -> Iterable:
    """``items`` wrapped in a transient ``tqdm`` bar when ``enabled`` and on a terminal."""
    if not (enabled and on_terminal()):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


@contextmanager
def transformers_bars() -> Iterator[None]:
    """transformers' own bars (``from_pretrained``'s "Loading weights") by the same rule, for the
    block: off when not on a terminal, then as they were."""
    from transformers.utils import logging as hf_logging

    hide = hf_logging.is_progress_bar_enabled() and not on_terminal()
    if hide:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            hf_logging.enable_progress_bar()
