r"""The label-free temperature of a distilled student: one scalar on its logits, fitted to the
teacher.

With student logits :math:`z_i` and teacher probabilities :math:`p_i`, the fitted temperature
is :math:`\tau = 1/\beta^*` with

.. math::

    \beta^* = \arg\min_\beta \frac1n \sum_i \mathrm{KL}\big(p_i \,\|\, \mathrm{softmax}(\beta z_i)\big),
    \qquad f'(\beta) = \frac1n \sum_i \big(E_{\mathrm{softmax}(\beta z_i)}[z] - E_{p_i}[z]\big),

and :math:`f''(\beta) = \frac1n \sum_i \mathrm{Var}_{\mathrm{softmax}(\beta z_i)}[z] \ge 0`: the
objective is convex in :math:`\beta`, so :math:`f'` is increasing and its root is found by
bisection on :math:`\log \beta`. No label enters.
"""

from __future__ import annotations

import math

import torch

BOUNDS = (0.05, 20.0)  # of the temperature; a fit on the boundary is returned there


def fit_temperature(logits: torch.Tensor, teacher_log_probs: torch.Tensor,
                    bounds: tuple[float, float] = BOUNDS, iters: int = 60) -> float:
    """The temperature :math:`\\tau` minimising the mean ``KL(teacher || softmax(logits / tau))``.

    Parameters
    ----------
    logits : torch.Tensor
        Student logits, ``(n, C)``.
    teacher_log_probs : torch.Tensor
        Teacher log-probabilities (or logits), ``(n, C)``.
    bounds : (float, float)
        Range of :math:`\\tau`.
    iters : int
        Bisection steps on :math:`\\log \\beta` (60 resolve the range to float64 precision).
    """
    if logits.shape != teacher_log_probs.shape or logits.dim() != 2 or not len(logits):
        raise ValueError(f"logits {tuple(logits.shape)} and teacher log-probabilities "
                         f"{tuple(teacher_log_probs.shape)} must be the same (n, C), n > 0")
    z = logits.double()
    if not float(z.var(-1, correction=0).max()):  # constant rows: every temperature fits
        return 1.0
    target = (teacher_log_probs.double().log_softmax(-1).exp() * z).sum(-1).mean()

    def slope(beta: float) -> float:
        return float(((beta * z).softmax(-1) * z).sum(-1).mean() - target)

    lo, hi = math.log(1 / bounds[1]), math.log(1 / bounds[0])
    if slope(math.exp(lo)) >= 0:
        return bounds[1]
    if slope(math.exp(hi)) <= 0:
        return bounds[0]
    for _ in range(iters):
        mid = (lo + hi) / 2
        if slope(math.exp(mid)) < 0:
            lo = mid
        else:
            hi = mid
    return 1.0 / math.exp((lo + hi) / 2)
