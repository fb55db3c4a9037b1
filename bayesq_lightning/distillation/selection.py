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

Where the hold-out has labels (the calibration data the posterior was fitted on does), the
candidate must clear the same bar on them: its paired gain in label NLL,
:math:`\ell_{0,i} - \ell_{e^*,i}`, must also exceed ``z`` standard errors. The teacher is not
the truth: a student already as close to the labels as its teacher (a quantization that happens
to regularise) moves away from them when pulled toward the teacher, while its KL to the teacher
still falls; only labels see that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MIN_HOLDOUT = 16  # hold-out inputs below which no standard error is trusted to choose an epoch


@dataclass(frozen=True)
class EpochChoice:
    """The kept epoch (0: undistilled), the lowest-mean epoch, its paired KL gain ± SE, and its
    paired hold-out NLL gain ± SE (``None`` without labels)."""

    epoch: int
    lowest: int
    gain: float
    gain_se: float
    nll_gain: float | None = None
    nll_gain_se: float | None = None


def _paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = a - b
    return float(d.mean()), (float(d.std()) / math.sqrt(len(d)) if len(d) > 1 else math.inf)


def choose_epoch(kls: Sequence[torch.Tensor], min_gain_se: float,
                 nlls: Sequence[torch.Tensor] | None = None) -> EpochChoice:
    """The epoch to keep from ``kls[e]``, the per-input hold-out KLs after epoch ``e``, and
    ``nlls[e]``, the same inputs' label NLLs (``None``: no labels, the KL rule alone)."""
    k = torch.stack([t.double().reshape(-1) for t in kls])
    lowest = int(k.mean(1).argmin())
    if lowest == 0:
        return EpochChoice(0, 0, 0.0, 0.0)
    gain, se = _paired(k[0], k[lowest])
    keep = gain > min_gain_se * se
    nll_gain = nll_se = None
    if nlls is not None:
        nll_gain, nll_se = _paired(nlls[0].double().reshape(-1), nlls[lowest].double().reshape(-1))
        keep = keep and nll_gain > min_gain_se * nll_se
    return EpochChoice(lowest if keep else 0, lowest, gain, se, nll_gain, nll_se)
