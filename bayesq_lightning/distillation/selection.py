r"""Which distillation epoch to keep, from the per-input KL to the teacher on a hold-out.

With :math:`k_{e,i}` the KL of hold-out input :math:`i` after epoch :math:`e` (``e = 0``: the
undistilled student), the candidate is :math:`e^* = \arg\min_e \bar k_e` (the earliest on ties),
and it is kept only if its paired gain clears the noise,

.. math::

    \bar d > z\, \frac{s_d}{\sqrt n}, \qquad d_i = k_{0,i} - k_{e^*,i},

with :math:`s_d` the sample standard deviation and ``z = min_gain_se``; otherwise the student
stays undistilled. On a small hold-out the per-epoch minimum alone follows its noise: among
several epochs one usually looks better than epoch 0 by chance, and keeping it is how
distillation hurt test NLL on small calibration sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MIN_HOLDOUT = 16  # hold-out inputs below which no standard error is trusted to choose an epoch


@dataclass(frozen=True)
class EpochChoice:
    """The kept epoch (0: undistilled), the lowest-mean epoch, and its paired gain ± SE."""

    epoch: int
    lowest: int
    gain: float
    gain_se: float


def choose_epoch(kls: Sequence[torch.Tensor], min_gain_se: float) -> EpochChoice:
    """The epoch to keep from ``kls[e]``, the per-input hold-out KLs after epoch ``e``."""
    k = torch.stack([t.double().reshape(-1) for t in kls])
    lowest = int(k.mean(1).argmin())
    if lowest == 0:
        return EpochChoice(0, 0, 0.0, 0.0)
    d = k[0] - k[lowest]
    gain = float(d.mean())
    se = float(d.std()) / math.sqrt(len(d)) if len(d) > 1 else math.inf
    return EpochChoice(lowest if gain > min_gain_se * se else 0, lowest, gain, se)
