r"""Non-uniform quantizer: fp16 codebooks and the closed-form expected error of a level set.

:func:`expected_sq_error_levels` evaluates the posterior-expected squared error of any sorted
level set (thresholds at the midpoints). :func:`design_nonuniform` fits ``2**bits`` fp16 levels
per block or per row by posterior-weighted Lloyd-Max
(:func:`~bayesq_lightning.quantizers.lloyd.lloyd_max`) on the mixture
:math:`\sum_i \lambda_i N(\mu_i, \sigma_i^2)`, i.e. it minimises the whitened expected
distortion :math:`\sum_i \lambda_i E[(Q(w_i) - w_i)^2]`, or by weighted k-means on the means
(``range_objective="deployed"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..choices import SEARCHED_RANGES, check_bits
from .lloyd import lloyd_max
from .mixture import CHUNK
from .normal import cell_terms


def _weight_chunks(n_rows: int, n_cols: int):
    """``(r0, r1, c0, c1)`` blocks of at most about ``CHUNK`` weights; whole rows when they fit."""
    if n_cols >= CHUNK:
        for r in range(n_rows):
            for c0 in range(0, n_cols, CHUNK):
                yield r, r + 1, c0, min(c0 + CHUNK, n_cols)
    else:
        step = max(1, CHUNK // max(n_cols, 1))
        for r0 in range(0, n_rows, step):
            yield r0, min(r0 + step, n_rows), 0, n_cols


def _rows_view(mu: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared levels ``(L,)`` -> one row ``(1, n)``; per-row levels ``(R, L)`` -> ``(R, n)``."""
    if levels.dim() == 1:
        return mu.reshape(1, -1), levels.reshape(1, -1)
    if levels.dim() == 2 and mu.dim() >= 1 and mu.shape[0] == levels.shape[0]:
        return mu.reshape(levels.shape[0], -1), levels
    raise ValueError(
        f"levels of shape {tuple(levels.shape)} do not fit mu of shape {tuple(mu.shape)}: "
        "use (L,) for one shared level set or (rows, L) with mu of shape (rows, cols)"
    )


def expected_sq_error_levels(
    mu: torch.Tensor, sigma: torch.Tensor, levels: torch.Tensor
) -> torch.Tensor:
    r"""Posterior-expected squared error :math:`E_w[(Q(w) - w)^2]` of an arbitrary level set.

    :math:`Q` maps :math:`w` to the nearest level: with sorted levels :math:`c_0 \le \dots \le
    c_{L-1}` and thresholds at the midpoints :math:`t_k = (c_k + c_{k+1})/2`, the cell of level
    :math:`k` is :math:`(t_{k-1}, t_k]` (:math:`t_{-1} = -\infty`, :math:`t_{L-1} = +\infty`).
    For :math:`w \sim N(\mu, \sigma^2)`, with :math:`a = (t_{k-1}-\mu)/\sigma`,
    :math:`b = (t_k-\mu)/\sigma`, :math:`d = (c_k-\mu)/\sigma`,

    .. math::

        E[(Q(w) - w)^2] = \sigma^2 \sum_k (1 + d^2)(\Phi(b) - \Phi(a)) - 2d(\phi(a) - \phi(b))
                          + a\phi(a) - b\phi(b).

    Only the cells meeting :math:`[\mu - 6\sigma, \mu + 6\sigma]` are summed (the others carry
    less than :math:`2\Phi(-6) \approx 2 \cdot 10^{-9}` of the mass); each of those is evaluated
    exactly at its true thresholds. The cells are walked one position at a time, each pass
    vectorised over the weights whose window still has cells left, in chunks of weights:
    memory ``O(n)``, never ``n x L``. ``sigma == 0`` gives the point value :math:`(Q(\mu) - \mu)^2`.

    Parameters
    ----------
    mu : torch.Tensor
        Posterior means; any shape for shared levels, ``(rows, ...)`` for per-row levels.
    sigma : torch.Tensor
        Posterior standard deviations (``>= 0``), broadcastable to ``mu``.
    levels : torch.Tensor
        Sorted levels: ``(L,)`` shared by all weights, or ``(rows, L)``, one set per row of
        ``mu``.

    Returns
    -------
    torch.Tensor
        Expected squared error in weight units, shape of ``mu`` (its dtype if floating, else
        float32).
    """
    if not mu.is_floating_point():
        mu = mu.float()
    dt, shape = mu.dtype, mu.shape
    m2, lv = _rows_view(mu, levels.to(dt))
    s2 = sigma.to(dt).expand(shape).reshape(m2.shape)
    R, n = m2.shape
    L = lv.shape[1]
    thr = (0.5 * (lv[:, 1:] + lv[:, :-1])).contiguous()  # (R, L-1)
    inf = torch.full((R, 1), math.inf, dtype=dt)
    edges = torch.cat([-inf, thr, inf], dim=1)  # cell k of row r: (edges[r, k], edges[r, k+1]]
    out = torch.empty(R, n, dtype=dt)
    for r0, r1, c0, c1 in _weight_chunks(R, n):
        m, g, t = m2[r0:r1, c0:c1], s2[r0:r1, c0:c1], thr[r0:r1]
        point = g <= 0
        g = torch.where(point, torch.ones_like(g), g)
        k_pt = torch.searchsorted(t, m.contiguous())  # cell holding mu
        k_lo = torch.where(point, k_pt, torch.searchsorted(t, (m - 6.0 * g).contiguous()))
        k_hi = torch.where(point, k_pt, torch.searchsorted(t, (m + 6.0 * g).contiguous()))
        # walk the cells k_lo..k_hi of every weight; weights leave once their window is done
        row = torch.arange(r1 - r0).unsqueeze(1).expand_as(m).flatten()
        e_flat, l_flat = edges[r0:r1].flatten(), lv[r0:r1].contiguous().flatten()
        e_idx = row * (L + 1) + k_lo.flatten()  # lower edge of the current cell
        l_idx = row * L + k_lo.flatten()  # its level
        left = (k_hi - k_lo).flatten()  # cells after the current one
        m_a, g_a = m.flatten(), g.flatten()
        idx = torch.arange(m_a.numel())
        acc = torch.zeros_like(m_a)
        a = (e_flat[e_idx] - m_a) / g_a
        while True:
            b = (e_flat[e_idx + 1] - m_a) / g_a
            d = (l_flat[l_idx] - m_a) / g_a
            acc.index_add_(0, idx, cell_terms(a, b, d))
            more = left > 0
            if not bool(more.any()):
                break
            if not bool(more.all()):
                keep = torch.nonzero(more).squeeze(1)
                idx, m_a, g_a, b = idx[keep], m_a[keep], g_a[keep], b[keep]
                e_idx, l_idx, left = e_idx[keep], l_idx[keep], left[keep]
            a, e_idx, l_idx, left = b, e_idx + 1, l_idx + 1, left - 1
        res = (acc * g.flatten() ** 2).view(m.shape)
        if bool(point.any()):
            q = torch.gather(lv[r0:r1], 1, k_pt)
            res = torch.where(point, (q - m) ** 2, res)
        out[r0:r1, c0:c1] = res
    return out.reshape(shape)


@dataclass
class NonuniformGrid:
    """fp16 codebook, the codes of the posterior mean on it, and the unrounded float64 levels.

    ``codebook`` is sorted, ``(2**bits,)`` or ``(rows, 2**bits)``; ``codes`` is ``uint8``
    ``(rows, cols)`` with every code the nearest stored (fp16) level of ``mu``; ``levels`` are
    the Lloyd-Max levels before rounding (same shape as ``codebook``).
    """

    codebook: torch.Tensor
    codes: torch.Tensor | None
    levels: torch.Tensor | None = None
    n_iter: int = 0
    converged: bool = False


def design_nonuniform(
    mu: torch.Tensor,
    bits: int,
    precision: torch.Tensor | None = None,
    per_row: bool = False,
    max_iter: int = 100,
    tol: float = 1e-6,
    range_objective: str = "expected",
    round_mean: bool = True,
    weight: torch.Tensor | None = None,
) -> NonuniformGrid:
    r"""``2**bits`` fp16 levels per block (or per row) by posterior-weighted Lloyd-Max.

    ``range_objective="deployed"`` instead weights the point masses ``mu`` by ``precision``
    (weighted k-means: the deployed risk :math:`\sum_i \lambda_i (Q(\mu_i) - \mu_i)^2` that the
    tables score); the default ``"expected"`` is the posterior mixture described next.

    The levels minimise the whitened posterior-expected distortion

    .. math::

        \sum_i \lambda_i E_{w_i \sim N(\mu_i, \lambda_i^{-1})}[(Q(w_i) - w_i)^2],

    i.e. Lloyd-Max on the mixture :math:`\sum_i \lambda_i N(\mu_i, \sigma_i^2)`,
    :math:`\sigma_i = \lambda_i^{-1/2}` (see :func:`lloyd_max`: truncated-normal centroids,
    initialisation at the mixture's quantiles :math:`(k + 1/2)/L`, empty cells keep their
    level). With ``precision=None``: plain 1-D k-means on ``mu`` (point masses, equal weights),
    initialised at the ``"hazen"`` quantiles of ``mu``.

    After the iteration the levels are rounded to fp16 and sorted, and every code is the nearest
    *stored* level of ``mu`` (``bucketize`` on the midpoints of the fp16 levels, a tie going to
    the lower level), so :func:`dequantize` returns exactly the nearest codebook entry.

    Parameters
    ----------
    mu : torch.Tensor
        Posterior mean, ``(rows, cols)``.
    bits : int
        Bit-width; ``2**bits`` levels.
    precision : torch.Tensor, optional
        Posterior precision :math:`\lambda = 1/\sigma^2`, broadcastable to ``mu`` (clamped
        below at ``1e-30``).
    per_row : bool
        One codebook per row (vectorised over rows) instead of one for the block.
    max_iter : int
        Maximum number of Lloyd updates.
    tol : float
        Convergence tolerance on level movement relative to the level spread.
    range_objective : {"expected", "deployed"}
        Posterior mixture (Lloyd-Max) or precision-weighted point masses (weighted k-means).
    round_mean : bool
        Round ``mu`` onto the codebook; ``False`` leaves ``codes=None`` (error feedback follows).
    weight : torch.Tensor, optional
        Importance of each weight in the objective (e.g. the curvature), broadcastable to
        ``mu``; default ``precision``. ``precision`` then only sets the posterior's spread.

    Returns
    -------
    NonuniformGrid
        ``codebook`` fp16 ``(2**bits,)`` or ``(rows, 2**bits)``, ``codes`` uint8
        ``(rows, cols)`` (or ``None``), float64 ``levels``, ``n_iter``, ``converged``.
    """
    bits = check_bits(bits)
    if mu.dim() != 2:
        raise ValueError(f"mu must be (rows, cols), got shape {tuple(mu.shape)}")
    if range_objective not in SEARCHED_RANGES:
        raise ValueError(f"range_objective={range_objective!r}: use one of {SEARCHED_RANGES}")
    L = 2**bits
    sigma = None
    if precision is not None:
        lam = precision.to(torch.float64).expand(mu.shape).clamp_min(1e-30)
        sigma = lam.rsqrt() if range_objective == "expected" else None
        weight = lam if weight is None else weight.to(torch.float64).expand(mu.shape).clamp_min(
            1e-30)
    else:  # plain k-means on the point values
        weight = None
    x = mu if per_row else mu.reshape(-1)
    res = lloyd_max(
        x,
        L,
        sigma=None if sigma is None else sigma.reshape(x.shape),
        weight=None if weight is None else weight.reshape(x.shape),
        max_iter=max_iter,
        tol=tol,
    )
    book = res.levels.half()
    if not bool(torch.isfinite(book).all()):
        raise ValueError("codebook levels overflow fp16; rescale the layer or exclude it")
    book = book.sort(dim=-1).values
    if not round_mean:  # the caller rounds by error feedback
        return NonuniformGrid(codebook=book, codes=None, levels=res.levels, n_iter=res.n_iter,
                              converged=res.converged)
    b64 = book.double()  # fp16 midpoints are exact in float64
    mids = 0.5 * (b64[..., 1:] + b64[..., :-1])
    mu64 = mu.double()
    if per_row:
        codes = torch.searchsorted(mids.contiguous(), mu64.contiguous())  # row-wise bucketize
    else:
        codes = torch.bucketize(mu64, mids)
    return NonuniformGrid(
        codebook=book,
        codes=codes.to(torch.uint8),
        levels=res.levels,
        n_iter=res.n_iter,
        converged=res.converged,
    )
