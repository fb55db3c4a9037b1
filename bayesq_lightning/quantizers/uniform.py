r"""Scalar quantizers designed under the posterior, and their closed-form expected distortion.

Notation (used throughout this module)
--------------------------------------
``mu``, ``sigma``
    Posterior mean and standard deviation of each weight, :math:`w \sim N(\mu, \sigma^2)`.
``L = 2**bits``
    Number of levels. A uniform grid has levels :math:`c_k = s (k - z)`, :math:`k = 0..L-1`, with
    ``scale`` :math:`s` and float ``zero`` :math:`z` (a float zero also represents mid-rise grids).
    The cell of level :math:`k` is :math:`(t_{k-1}, t_k]` with thresholds at the midpoints
    :math:`t_k = s (k + 1/2 - z)`, :math:`t_{-1} = -\infty`, :math:`t_{L-1} = +\infty`.

Closed form. With :math:`a = (t_{k-1} - \mu)/\sigma`, :math:`b = (t_k - \mu)/\sigma`,
:math:`d = (c_k - \mu)/\sigma`,

.. math::

    E[(Q(w) - w)^2] = \sigma^2 \sum_k (1 + d^2)(\Phi(b) - \Phi(a)) - 2d(\phi(a) - \phi(b))
                      + a\phi(a) - b\phi(b).

Only cells meeting :math:`[\mu - 6\sigma, \mu + 6\sigma]` are evaluated, one threshold at a time
over all weights (memory ``O(n)``, never ``n x L``). When that interval spans more than
``_MAX_CELLS`` cells (``sigma`` several steps wide), the inner cells contribute
:math:`s^2/12` times their exact probability mass (Sheppard) and only the two unbounded outer
cells are evaluated exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..choices import SEARCHED_RANGES
from .codec import expand_groups, round_levels, round_uniform
from .normal import Phi, cell_terms

_MAX_CELLS = 40  # exact evaluation up to ~3 steps per sigma; Sheppard beyond


def expected_sq_error_uniform(
    mu: torch.Tensor,
    sigma: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    n_levels: int,
) -> torch.Tensor:
    r"""Posterior-expected squared error :math:`E_w[(Q(w) - w)^2]` of a uniform grid, per weight.

    Parameters
    ----------
    mu, sigma : torch.Tensor
        Posterior mean and standard deviation, same shape (any).
    scale, zero : torch.Tensor
        Grid step and float zero point, broadcastable to ``mu``.
    n_levels : int
        Number of levels ``L``.

    Returns
    -------
    torch.Tensor
        Expected squared error in weight units, shape of ``mu``.
    """
    scale, zero = torch.broadcast_tensors(scale.to(mu.dtype), zero.to(mu.dtype))
    scale, zero = scale.expand_as(mu), zero.expand_as(mu)
    sigma = sigma.to(mu.dtype).clamp_min(torch.finfo(mu.dtype).tiny)
    L = n_levels
    u = mu / scale + zero  # position in level units
    # Index of the first and last cell meeting [mu - 6 sigma, mu + 6 sigma].
    reach = 6.0 * sigma / scale
    k_lo = torch.floor(u - reach + 0.5).clamp(0, L - 1)
    k_hi = torch.floor(u + reach + 0.5).clamp(0, L - 1)
    n_cells = k_hi - k_lo + 1
    wide = n_cells > _MAX_CELLS

    out = torch.zeros_like(mu)
    narrow = ~wide
    if narrow.any():
        # Walk the window cell by cell; each pass is vectorised over all weights.
        kl, nc = k_lo[narrow], n_cells[narrow]
        s_, z_, m_, g_ = scale[narrow], zero[narrow], mu[narrow], sigma[narrow]
        acc = torch.zeros_like(m_)
        a = _thr(kl - 1, s_, z_, m_, g_, L)
        for j in range(int(nc.max().item())):
            k = kl + j
            b = _thr(k, s_, z_, m_, g_, L)
            d = (s_ * (k - z_) - m_) / g_
            term = cell_terms(a, b, d)
            acc = acc + torch.where(j < nc, term, torch.zeros_like(term))
            a = b
        out[narrow] = acc
    if wide.any():
        s_, z_, m_, g_ = scale[wide], zero[wide], mu[wide], sigma[wide]
        zero_k, last_k = torch.zeros_like(m_), torch.full_like(m_, L - 1)
        t_first = _thr(zero_k, s_, z_, m_, g_, L)  # upper edge of cell 0
        t_last = _thr(last_k - 1, s_, z_, m_, g_, L)  # lower edge of cell L-1
        ninf, pinf = torch.full_like(m_, -math.inf), torch.full_like(m_, math.inf)
        outer = cell_terms(ninf, t_first, (s_ * (0 - z_) - m_) / g_) + cell_terms(
            t_last, pinf, (s_ * (L - 1 - z_) - m_) / g_
        )
        inner_mass = (Phi(t_last) - Phi(t_first)).clamp_min(0)
        out[wide] = outer + inner_mass * (s_ / g_) ** 2 / 12.0
    return out * sigma * sigma


def _thr(
    k: torch.Tensor, s: torch.Tensor, z: torch.Tensor, m: torch.Tensor, g: torch.Tensor, L: int
) -> torch.Tensor:
    """Standardised upper threshold of cell ``k``; ``-inf`` for k < 0, ``+inf`` for k >= L-1."""
    t = (s * (k + 0.5 - z) - m) / g
    t = torch.where(k < 0, torch.full_like(t, -math.inf), t)
    return torch.where(k >= L - 1, torch.full_like(t, math.inf), t)


FP16_MIN_STEP = 2.0 ** -24  # smallest positive (subnormal) fp16


@dataclass
class UniformGrid:
    """fp16 scale and zero per (row, group), plus the codes of the posterior mean on that grid."""

    scale: torch.Tensor
    zero: torch.Tensor
    codes: torch.Tensor | None


def _grid_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) of the asymmetric grid whose end levels are ``lo`` and ``hi``."""
    # The grid holds 0 (lo <= 0 <= hi), so zero = -lo / scale <= 2**bits - 1 always fits fp16;
    # only a step below fp16's smallest subnormal (2**-24, all-zero or near-zero rows) would
    # round to 0, so that is the floor (the smallest *normal* step, 2**-14, is coarser than the
    # ideal step of a narrow 8-bit row).
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(FP16_MIN_STEP).half()
    zero = (-lo / scale.float()).half()
    bad = ~torch.isfinite(scale.float()) | ~torch.isfinite(zero.float())
    if bad.any():
        raise ValueError("weight range overflows fp16 scales (|w| > 65504); rescale the layer "
                         "or exclude it with exclude=[...]")
    return scale, zero


def _grouped(t: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(rows, cols) -> (rows, n_groups, group) with NaN padding of a short last group."""
    if group_size is None:
        return t.unsqueeze(1)
    rows, cols = t.shape
    n_groups = -(-cols // group_size)
    pad = n_groups * group_size - cols
    if pad:
        t = torch.cat([t, t.new_full((rows, pad), float("nan"))], dim=1)
    return t.view(rows, n_groups, group_size)


def design_uniform(
    mu: torch.Tensor,
    bits: int,
    precision: torch.Tensor | None = None,
    group_size: int | None = None,
    range_objective: str = "deployed",
    shrink_grid: int = 24,
    round_mean: bool = True,
    weight: torch.Tensor | None = None,
) -> UniformGrid:
    r"""Asymmetric uniform grid per row (or group), clipping range chosen under the posterior.

    For each row and candidate shrink factor ``p`` the grid spans ``[p min(mu), p max(mu)]`` and
    the ``p`` with the smallest whitened cost is kept:

    * ``range_objective="deployed"``: the weighted error of the stored weights
      :math:`\sum_i c_i (Q(\mu_i) - \mu_i)^2` (the weights actually stored are ``Q(mu)``; with
      ``c`` the curvature this is the score the tables use);
    * ``range_objective="expected"``: the posterior-expected distortion
      :math:`\sum_i c_i E_{w_i \sim N(\mu_i, 1/\lambda_i)}[(Q(w_i) - w_i)^2]` (closed form
      above), with :math:`\lambda` the posterior precision.

    The weights ``c`` are ``weight`` (default: ``precision``). With ``precision=None`` the range
    is plain min-max (the round-to-nearest baseline).

    Parameters
    ----------
    mu : torch.Tensor
        Posterior mean, ``(rows, cols)``.
    bits : int
        Bit-width.
    precision : torch.Tensor, optional
        Posterior precision :math:`\lambda = 1/\sigma^2`, ``(rows, cols)``.
    group_size : int, optional
        Columns per scale/zero; ``None`` for one per row.
    range_objective : {"deployed", "expected"}
        Range-search criterion (see above).
    shrink_grid : int
        Number of shrink factors tried, evenly spaced in ``[0.2, 1]``.
    round_mean : bool
        Round ``mu`` onto the grid (``codes``); ``False`` leaves ``codes=None`` for a caller
        that rounds by error feedback anyway.
    weight : torch.Tensor, optional
        Per-weight importance ``c`` of the objective, ``(rows, cols)``; default ``precision``.
    """
    mu = mu.float()
    g_mu = _grouped(mu, group_size)
    lo = torch.nan_to_num(g_mu, nan=math.inf).amin(dim=2).clamp_max(0.0)
    hi = torch.nan_to_num(g_mu, nan=-math.inf).amax(dim=2).clamp_min(0.0)
    if range_objective not in SEARCHED_RANGES:
        raise ValueError(f"range_objective={range_objective!r}: use one of {SEARCHED_RANGES}")
    if precision is None:
        scale, zero = _grid_from_range(lo, hi, bits)
    else:
        lam = torch.nan_to_num(_grouped(precision.float(), group_size))  # 0 on padding
        imp = lam if weight is None else torch.nan_to_num(_grouped(weight.float(), group_size))
        mu0 = torch.nan_to_num(g_mu)
        best = torch.full(lo.shape, math.inf)
        scale = zero = None
        for p in torch.linspace(1.0, 0.2, shrink_grid).tolist():
            s_p, z_p = _grid_from_range(p * lo, p * hi, bits)
            s_e, z_e = s_p.float().unsqueeze(-1), z_p.float().unsqueeze(-1)
            if range_objective == "deployed":
                # the levels decoded in their own buffer (integer levels are exact in fp32, so
                # this is dequantize's arithmetic), in place: one temporary per shrink factor
                err = round_levels(mu0, s_e, z_e, bits).sub_(z_e).mul_(s_e).sub_(mu0).square_()
            else:
                err = expected_sq_error_uniform(mu0, lam.clamp_min(1e-30).rsqrt(), s_e, z_e,
                                                2**bits)
            cost = (imp * err).sum(dim=2)
            if scale is None:
                scale, zero, best = s_p, z_p, cost
                continue
            better = cost < best
            best = torch.where(better, cost, best)
            scale, zero = torch.where(better, s_p, scale), torch.where(better, z_p, zero)
    if not round_mean:
        return UniformGrid(scale=scale, zero=zero, codes=None)
    cols = mu.shape[1]
    codes = round_uniform(
        mu, expand_groups(scale, cols, group_size), expand_groups(zero, cols, group_size), bits
    )
    return UniformGrid(scale=scale, zero=zero, codes=codes)
