"""torch's private API: the padding a convolution applies to its input itself.

Written against torch 2.14. ``nn.Conv2d`` keeps, in ``_reversed_padding_repeated_twice``, the
``F.pad`` padding of its input where it pads before the convolution (a string ``padding`` or a
``padding_mode`` other than ``"zeros"``); :func:`conv_input_padding` is the one reader.
"""

from __future__ import annotations

from torch import nn

PACKAGE, VERSION = "torch", "2.14"
ATTRIBUTES = (("Conv2d", "_reversed_padding_repeated_twice"),)
"""Private attributes of torch's modules read here: class, name."""


def conv_input_padding(module: nn.Conv2d) -> list[int]:
    """The ``F.pad`` padding (last dimension first) of ``module``'s own input padding."""
    return module._reversed_padding_repeated_twice
