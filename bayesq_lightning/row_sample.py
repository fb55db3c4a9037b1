r"""Choosing a block's width on a sample of its rows (``BayesQConfig.score_rows``).

Error feedback rounds every row of a block on its own (the column loop mixes columns, never
rows), and a uniform grid is designed per row, so the codes of rows ``S`` of a candidate are the
same whether the block is rounded whole or only ``S`` is. A block with ``R`` rows and ``K``
candidates (widths x grids) can therefore be designed, rounded and scored on a sample of
``r`` rows; after the knapsack only the chosen width's grids (one or two) are designed and
rounded on all ``R`` rows and scored exactly: about ``K r + 2 R`` rows of work instead of
``K R``, and the candidates held at ``r`` rows instead of ``R``.

**What the sample estimates.** A block's loss is a sum over row pairs,
:math:`D = \sum_{i,j} M_{ij}` (K-FAC: :math:`M_{ij} = G_{ij}\, dW_i A\, dW_j^\top`; GPTQ: only
:math:`i = j`, :math:`dW_i H dW_i^\top`). The sample estimates its row terms
:math:`y_i = M_{ii}`: rows are drawn ``r`` times with replacement with probability
:math:`p_i \propto g_i (\max_j w_{ij} - \min_j w_{ij})^2` (``g_i = G_{ii}``, GPTQ's 1: a row's
curvature times its grid step squared, the size of its rounding error), and
:math:`\hat D = \frac{1}{r} \sum_{k=1}^{r} y_{i_k} / p_{i_k}` is unbiased for
:math:`\sum_i y_i` (Hansen-Hurwitz), with a small variance where :math:`y_i \propto p_i`. The
cross-row terms of K-FAC are left out of the choice (an unbiased estimate of them from a sample
is far noisier than they are large; ``docs/design.md`` gives the measurement); the chosen
width's grids are then compared by their exact losses. A shared codebook designed on the sample
is an estimate too (per-row grids are exact).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .quantizers import storage_bits
from .result import BlockResult


@dataclass(frozen=True)
class RowTerms:
    """A block's loss split by rows: ``terms(dW of rows idx, idx)`` gives those rows' own terms
    (no cross-row ones), ``scales`` each row's curvature scale (``(rows,)`` float64), which
    weighs the row's sampling probability."""

    scales: Tensor
    terms: Callable[[Tensor, Tensor], Tensor]


def sample_rows(size: Tensor, n_draws: int, seed: int) -> tuple[Tensor, Tensor]:
    """Rows drawn ``n_draws`` times with probability ``size / size.sum()``, with replacement.

    Returns the distinct rows (sorted) and their weights ``count / (n_draws p_i)``:
    ``sum(weight * y[rows])`` is the unbiased estimate of ``y.sum()``. Sizes that are all zero
    (or not finite) draw uniformly.
    """
    size = size.double().clamp_min(0)
    if not (torch.isfinite(size).all() and size.sum() > 0):
        size = torch.ones_like(size)
    p = size / size.sum()
    gen = torch.Generator().manual_seed(seed)
    rows, counts = torch.multinomial(p, n_draws, replacement=True, generator=gen).unique(
        return_counts=True)
    return rows, counts / (n_draws * p[rows])


def full_block_bits(candidate: BlockResult, n_rows: int) -> int:
    """:func:`~bayesq_lightning.quantizers.storage_bits` of ``candidate``'s layout on
    ``n_rows`` rows (it holds a sample's): scales, zeros and per-row codebooks per row, a shared
    codebook once."""
    per_row = [t for t in (candidate.scale, candidate.zero, candidate.codebook)
               if t is not None and t.dim() == 2]
    shared = [t for t in (candidate.codebook,) if t is not None and t.dim() == 1]
    r, cols = candidate.codes.shape
    n_meta = sum(t.numel() // r for t in per_row) * n_rows + sum(t.numel() for t in shared)
    return storage_bits(n_rows * cols, candidate.bits, n_meta)
