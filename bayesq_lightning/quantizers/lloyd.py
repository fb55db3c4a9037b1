r"""Weighted Lloyd-Max levels for a Gaussian mixture (weighted 1-D k-means for point masses).

:func:`lloyd_max` alternates midpoint thresholds and truncated-normal centroids on the mixture
:math:`\sum_i \lambda_i N(\mu_i, \sigma_i^2)`, with per-cell sums from
:class:`~bayesq_lightning.quantizers.mixture.SortedMixture`; it starts from the mixture's
quantiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .mixture import SortedMixture

_MASS_FLOOR = 1e-13  # a cell holding less than this fraction of its row's weight is empty
_QUANTILE_RTOL = 1e-3  # initial levels: mixture quantiles to 1e-3 mixture std (bisection)


def _weighted_quantiles(v: torch.Tensor, weight: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    r"""Weighted quantiles of values already sorted per row, ``(R, n)`` -> ``(R, len(probs))``.

    Sorted values :math:`v_j` sit at plotting positions :math:`P_j = (W_j - \lambda_j/2)/W`
    (:math:`W_j` the cumulative weight, :math:`W` the total); the quantile at ``p`` interpolates
    linearly between them and is clamped to ``[v_0, v_{n-1}]``. With equal weights
    :math:`P_j = (j + 1/2)/n`: numpy's ``method="hazen"``.
    """
    cw = weight.cumsum(1)
    pos = (cw - 0.5 * weight) / cw[:, -1:]
    target = probs.to(v.dtype).expand(v.shape[0], -1).contiguous()
    i = torch.searchsorted(pos, target)
    n = v.shape[1]
    i_lo, i_hi = (i - 1).clamp(0, n - 1), i.clamp(0, n - 1)
    p_lo, p_hi = torch.gather(pos, 1, i_lo), torch.gather(pos, 1, i_hi)
    v_lo, v_hi = torch.gather(v, 1, i_lo), torch.gather(v, 1, i_hi)
    gap = p_hi - p_lo
    t = torch.where(gap > 0, (target - p_lo) / torch.where(gap > 0, gap, 1.0), 0.0).clamp(0, 1)
    return v_lo + t * (v_hi - v_lo)


def _mixture_quantiles(
    mix: SortedMixture,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    weight: torch.Tensor,
    probs: torch.Tensor,
) -> torch.Tensor:
    r"""Quantiles of the weighted mixture :math:`\sum_i \lambda_i N(\mu_i, \sigma_i^2)` per row.

    Bisection on the mixture CDF :math:`F(t) = \sum_i \lambda_i \Phi((t - \mu_i)/\sigma_i) /
    \sum_i \lambda_i`, all quantiles of all rows at once (one :meth:`SortedMixture.cdf` query
    per step), started from Cantelli's bracket :math:`m - s\sqrt{(1-p)/p} \le F^{-1}(p) \le m +
    s\sqrt{p/(1-p)}` (mixture mean :math:`m`, std :math:`s`) intersected with the span of the
    :math:`\pm 6\sigma` windows, and run until every bracket is narrower than
    ``_QUANTILE_RTOL * s``.
    """
    W = weight.sum(1, keepdim=True)
    mean = (weight * mu).sum(1, keepdim=True) / W
    var = (weight * ((mu - mean) ** 2 + sigma**2)).sum(1, keepdim=True) / W
    sd = var.sqrt()
    p = probs.to(mu.dtype).unsqueeze(0)
    lo = torch.maximum((mu - 6.0 * sigma).amin(1, keepdim=True), mean - sd * ((1 - p) / p).sqrt())
    hi = torch.minimum((mu + 6.0 * sigma).amax(1, keepdim=True), mean + sd * (p / (1 - p)).sqrt())
    hi = torch.maximum(hi, lo)
    target = p * W
    for _ in range(64):
        if not bool((hi - lo > _QUANTILE_RTOL * sd).any()):
            break
        mid = 0.5 * (lo + hi)
        s_mid, order = mid.sort(dim=1)
        G0, _ = mix.cdf(s_mid, first_moment=False)
        below_sorted = G0 < target.expand_as(mid).gather(1, order)  # F(mid) < p
        below = torch.empty_like(below_sorted).scatter_(1, order, below_sorted)
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (0.5 * (lo + hi)).sort(dim=1).values


@dataclass
class LloydMaxResult:
    """Unrounded Lloyd-Max levels (float64, sorted) and how the iteration ended."""

    levels: torch.Tensor
    n_iter: int
    converged: bool


def lloyd_max(
    mu: torch.Tensor,
    n_levels: int,
    sigma: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> LloydMaxResult:
    r"""Weighted Lloyd-Max levels for the mixture :math:`\sum_i \lambda_i N(\mu_i, \sigma_i^2)`.

    Minimises the weighted expected distortion :math:`\sum_i \lambda_i E[(Q(w_i) - w_i)^2]`,
    :math:`w_i \sim N(\mu_i, \sigma_i^2)`, over ``n_levels`` sorted levels with nearest-level
    :math:`Q` (thresholds :math:`t_k` at the midpoints, cells :math:`(t_{k-1}, t_k]`), by
    alternating the two optimality conditions:

    .. math::

        t_k = \frac{c_k + c_{k+1}}{2}, \qquad
        c_k = \frac{\sum_i \lambda_i E[w_i 1\{t_{k-1} < w_i \le t_k\}]}
                   {\sum_i \lambda_i P(t_{k-1} < w_i \le t_k)},

    with the truncated-normal moments :math:`P = \Phi(b) - \Phi(a)`, :math:`E[w 1\{\cdot\}] =
    \mu(\Phi(b) - \Phi(a)) + \sigma(\phi(a) - \phi(b))` (:math:`a, b` the standardised
    thresholds). The per-cell sums come from :class:`SortedMixture` (sorted once; per update
    only the weights within :math:`6\sigma` of a threshold are evaluated, or wide posteriors
    are read from a table; never ``n x L``). A cell with (relative) mass below ``1e-13`` is
    empty and keeps its previous level. With ``sigma=None`` every weight is a
    point mass and this is weighted 1-D k-means (plain Lloyd).

    Initialisation (deterministic), at probabilities :math:`p_k = (k + 1/2)/L`: for point masses
    the weighted quantiles of ``mu`` (plotting positions :math:`(W_j - \lambda_j/2)/W`; numpy's
    ``"hazen"`` rule for equal weights), otherwise the quantiles of the weighted mixture itself
    (bisection on its CDF to ``1e-3`` mixture standard deviations), which stay distinct even
    when a single wide Gaussian makes up the whole mixture.

    Stops when :math:`\max_k |c_k^{new} - c_k^{old}| \le` ``tol`` :math:`(c_{L-1} - c_0)` for
    every row, or after ``max_iter`` updates.

    Parameters
    ----------
    mu : torch.Tensor
        Means: ``(n,)`` for one level set, ``(rows, n)`` for one level set per row.
    n_levels : int
        Number of levels ``L``.
    sigma : torch.Tensor, optional
        Standard deviations (``>= 0``), broadcastable to ``mu``; ``None`` for point masses.
    weight : torch.Tensor, optional
        Non-negative weights :math:`\lambda_i` (the precision for whitened distortion),
        broadcastable to ``mu``; ``None`` for equal weights.
    init : torch.Tensor, optional
        Initial levels ``(L,)`` or ``(rows, L)``, replacing the quantile initialisation.
    max_iter : int
        Maximum number of level updates.
    tol : float
        Convergence tolerance on the level movement relative to the level spread.

    Returns
    -------
    LloydMaxResult
        ``levels`` float64, sorted, ``(L,)`` or ``(rows, L)``; ``n_iter`` updates done;
        ``converged``.
    """
    if mu.dim() not in (1, 2) or mu.numel() == 0:
        raise ValueError(f"mu must be a non-empty (n,) or (rows, n) tensor, got {tuple(mu.shape)}")
    if int(n_levels) != n_levels or n_levels < 1:
        raise ValueError(f"n_levels must be a positive integer, got {n_levels!r}")
    L = int(n_levels)
    dt = torch.float64
    shared = mu.dim() == 1
    m = mu.to(dt).reshape(1, -1) if shared else mu.to(dt)
    w = torch.ones_like(m) if weight is None else weight.to(dt).expand(mu.shape).reshape(m.shape)
    g = None if sigma is None else sigma.to(dt).expand(mu.shape).reshape(m.shape).contiguous()
    w = w.contiguous()
    if not bool(torch.isfinite(m).all()):
        raise ValueError("mu has non-finite entries")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or bool((w.sum(1) <= 0).any()):
        raise ValueError("weight must be finite, non-negative and not all zero in a row")
    if g is not None and (not bool(torch.isfinite(g).all()) or bool((g < 0).any())):
        raise ValueError("sigma must be finite and non-negative")
    mix = SortedMixture(m, g, w, n_points=L, n_queries=max_iter + 20)
    probs = (torch.arange(L, dtype=dt) + 0.5) / L
    if init is not None:
        levels = init.to(dt).expand(m.shape[0], L).sort(dim=1).values
    elif g is None:
        levels = _weighted_quantiles(mix.v_rows, mix.w_rows, probs)
    else:
        levels = _mixture_quantiles(mix, m, g, w, probs)
    floor = _MASS_FLOOR * mix.total0.unsqueeze(1)
    n_iter, converged = 0, False
    while n_iter < max_iter:
        S0, S1 = mix.cells(0.5 * (levels[:, 1:] + levels[:, :-1]))
        full = S0 > floor
        new = torch.where(full, S1 / torch.where(full, S0, 1.0), levels).sort(dim=1).values
        move = (new - levels).abs().amax(dim=1)
        levels = new
        n_iter += 1
        if bool((move <= tol * (levels[:, -1] - levels[:, 0])).all()):
            converged = True
            break
    return LloydMaxResult(levels[0] if shared else levels, n_iter, converged)
