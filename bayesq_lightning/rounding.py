r"""Sequential rounding with error feedback (OBS/GPTQ style) under an input-side precision.

One code path, two callers: BayesQ-kron rounds under the Kronecker factor ``A``, GPTQ under
``H = X X^T / n``, both damped relative to the matrix's scale, ``gamma = damp * mean(diag H)``
(:func:`gptq_gamma`, ``damp = 0.01`` as in GPTQ). Any quantizer plugs in
through a per-column callback (:func:`block_column_quantizer` for a candidate's grid or codebook);
:func:`feedback_round_blocks` re-rounds one allocation block's candidates (every width and grid)
in one stacked pass, per group for grouped convolutions.

Notation
--------
``W``
    Weights ``(rows, cols)``: output channels x inputs. A Conv2d weight is ``W.flatten(1)``,
    ``cols = in / groups * kh * kw`` in the order of :class:`torch.nn.Unfold`.
``H``
    Input-side precision ``(cols, cols)``, symmetric PSD. The objective is the whitened error
    :math:`\mathrm{tr}(\Delta W\, H\, \Delta W^T)`, :math:`\Delta W = Q - W`, always with the
    *undamped* ``H``. For ``H = X X^T / n`` it is the mean squared output error
    :math:`\|\Delta W X\|_F^2 / n`.
``gamma``
    Damping added to ``diag(H)`` before inversion; only the rounding sees it.
``Hinv``
    Upper Cholesky factor ``U`` of :math:`(H + \gamma I)^{-1}` (:math:`U^T U = (H+\gamma I)^{-1}`).
    Row ``i`` of ``U`` says how the error of column ``i`` is spread over the columns after it,
    given that the columns before ``i`` are fixed: the OBS update, precomputed for every step.
``Q``, ``codes``
    Dequantized weights and their integer codes, both ``(rows, cols)`` in the original order.
``Err``
    Scaled errors :math:`(w_i - q_i) / U_{ii}` of the columns of the current block, applied to the
    columns after the block in one matrix product (lazy batch update, ``block_size`` columns).

The work is done on ``W^T`` so that every column is contiguous in memory.

Algorithm, column by column in processing order (act-order: descending ``diag(H)``, stable):
``q_i = quantize(w_i)``; ``e_i = (w_i - q_i) / U_ii``; ``w_j -= e_i U_ij`` for every ``j > i``.

Dead columns (``diag(H) == 0``: the input is always zero there) get ``H[d, d] = 1`` as in GPTQ,
so the factorisation exists. Since a PSD ``H`` with a zero diagonal entry has a zero row and
column, such a column neither gives nor receives feedback: it is plain round-to-nearest.
(Unlike GPTQ the weight is kept, not zeroed: the layer's output does not depend on it.)

A nearly singular ``H`` (activations of about ``1e-10``: the inverse's entries overflow fp32; a
negative eigenvalue from round-off) can make the factorisation fail. It is then retried on
``H / mean(diag H)`` in float64 (error feedback depends on ``U`` only up to a scale), with the
damping relative to that scale raised tenfold per retry from ``gamma / mean(diag H)`` (at least
:data:`RETRY_DAMP_MIN`) up to :data:`RETRY_DAMP_MAX`; past that, the diagonal of ``H`` alone
(no feedback: round to nearest). One warning names the layer and the damping used; the run
goes on.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .quantizers import round_levels
from .result import BlockResult

QuantizeColumn = Callable[[Tensor, int], tuple[Tensor, Tensor]]
"""``(w_col (rows,), original column index) -> (codes uint8 (rows,), q_col float (rows,))``."""

_NOT_PD = (
    "H + gamma*I is not positive definite ({what}); the rounding needs a positive definite "
    "damped matrix. Increase gamma (GPTQ uses gptq_gamma(H) = 0.01 * mean(diag H); try 10x "
    "that) or check H for negative eigenvalues (H must be symmetric PSD)."
)


RETRY_DAMP_MIN = 1e-8
"""Smallest damping (relative to ``mean(diag H)``) a retried factorisation starts from."""
RETRY_DAMP_MAX = 1.0
"""Largest damping (relative to ``mean(diag H)``) a retried factorisation tries."""

OnRetry = Callable[[str], None]
"""Told the damping (in words) of a factorisation that had to be retried."""


def _cholesky_of_inverse(H: Tensor) -> Tensor | None:
    """``U`` upper triangular with ``U^T U = H^{-1}``, or ``None`` if a factorisation fails."""
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    return U if info.item() == 0 and bool(torch.isfinite(U).all()) else None


def _upper_cholesky_of_inverse(H: Tensor) -> Tensor:
    """``U`` upper triangular with ``U^T U = H^{-1}``; a clear ``ValueError`` if ``H`` is not PD."""
    if not torch.isfinite(H).all():
        raise ValueError(_NOT_PD.format(what="H has non-finite entries"))
    U = _cholesky_of_inverse(H)
    if U is None:
        info = torch.linalg.cholesky_ex(H).info.item()
        raise ValueError(_NOT_PD.format(what=f"Cholesky failed at column {info - 1}"
                                        if info else "the inverse's Cholesky failed"))
    return U


def _retried_cholesky(Hd: Tensor, gamma: float) -> tuple[Tensor, str]:
    """``U`` (up to a scale, in ``Hd``'s dtype) of a finite ``Hd`` (dead columns set,
    permuted, undamped) whose damped factorisation failed, and the damping used, in words."""
    H64 = Hd.double()
    scale = float(H64.diagonal().mean())
    if not scale > 0:
        raise ValueError(_NOT_PD.format(what="diag(H) has no positive mean"))
    Hn = H64 / scale
    eye = torch.eye(len(Hn), dtype=torch.float64, device=Hn.device)
    damp = max(gamma / scale, RETRY_DAMP_MIN)
    while damp <= RETRY_DAMP_MAX * (1 + 1e-9):
        U = _cholesky_of_inverse(Hn + damp * eye)
        if U is not None:
            return U.to(Hd.dtype), f"{damp:.3g} * mean(diag H) in float64"
        damp *= 10
    d = Hn.diagonal().clamp_min(0) + RETRY_DAMP_MAX
    return torch.diag(d.rsqrt()).to(Hd.dtype), (
        f"diag(H) + {RETRY_DAMP_MAX:g} * mean(diag H) alone (round to nearest): H is far from "
        "positive semi-definite")


def warn_damped(layer: str | None, damping: str, factors: FeedbackFactors | None) -> None:
    """The one warning of a retried factorisation (once per layer and ``factors``)."""
    if factors is not None:
        if layer in factors.warned:
            return
        factors.warned.add(layer)
    where = f"layer {layer!r}" if layer else "a layer"
    warnings.warn(f"error-feedback rounding of {where}: H + gamma*I is not positive definite "
                  "in fp32 (a nearly singular H, e.g. activations near zero); rounded under a "
                  f"damping of {damping}", RuntimeWarning, stacklevel=2)


def _factorise(H: Tensor, gamma: float, act_order: bool, dtype: torch.dtype,
               device: torch.device, on_retry: OnRetry | None = None) -> tuple[Tensor, Tensor]:
    """Column order and ``U`` (``U^T U = (H + gamma I)^{-1}``, permuted) of error feedback;
    up to a scale where the factorisation was retried (``on_retry`` is told the damping)."""
    cols = H.shape[0]
    Hd = H.detach().to(device=device, dtype=dtype).clone()
    dead = Hd.diagonal() == 0
    Hd[dead, dead] = 1.0
    perm = (torch.argsort(Hd.diagonal(), descending=True, stable=True) if act_order
            else torch.arange(cols, device=device))
    Hd = Hd[perm][:, perm]
    damped = Hd.clone()
    damped.diagonal().add_(gamma)
    if not torch.isfinite(damped).all():
        raise ValueError(_NOT_PD.format(what="H has non-finite entries"))
    try:
        return perm, _upper_cholesky_of_inverse(damped)
    except ValueError:
        U, damping = _retried_cholesky(Hd, gamma)
    if on_retry is not None:
        on_retry(damping)
    return perm, U


class FeedbackFactors:
    """The factorisation of the matrix error feedback last rounded under, for reuse.

    Every candidate (width, grid) of every block of a layer rounds under the same ``H``, so one
    factorisation serves them all. The owner (a pipeline stage) passes one of these to each
    rounding call, edits no matrix in place while it does, and drops it when the stage ends.
    The entry holds ``H`` itself, so another tensor cannot take its identity; the factors are
    exactly those a fresh computation gives.
    """

    def __init__(self) -> None:
        self._last: tuple[Tensor, tuple, tuple[Tensor, Tensor]] | None = None
        self.warned: set[str | None] = set()
        """Layers whose retried factorisation was warned about (:func:`warn_damped`)."""

    def __call__(self, H: Tensor, gamma: float, act_order: bool, dtype: torch.dtype,
                 device: torch.device, on_retry: OnRetry | None = None) -> tuple[Tensor, Tensor]:
        key = (float(gamma), act_order, dtype, device)
        if self._last is not None and self._last[0] is H and self._last[1] == key:
            return self._last[2]
        factors = _factorise(H, gamma, act_order, dtype, device, on_retry)
        self._last = (H, key, factors)
        return factors


def error_feedback_round(
    W: Tensor,
    H: Tensor,
    quantize_column: QuantizeColumn,
    gamma: float,
    block_size: int = 128,
    act_order: bool = False,
    objective: bool = True,
    factors: FeedbackFactors | None = None,
    layer: str | None = None,
) -> tuple[Tensor, Tensor, float | None]:
    r"""Quantize ``W`` column by column, feeding each column's error forward through ``Hinv``.

    Parameters
    ----------
    W : Tensor
        ``(rows, cols)`` float weights (not modified). Worked on in float64 if ``W`` is float64,
        else in float32.
    H : Tensor
        ``(cols, cols)`` symmetric PSD input-side precision (undamped).
    quantize_column : callable
        ``(w_col, col) -> (codes, q_col)``; ``col`` is the column's index in the *original*
        order (so group-wise grids stay right under ``act_order``).
    gamma : float
        Damping added to ``diag(H)`` for the rounding.
    block_size : int
        Columns per lazy batch update; the result does not depend on it (up to float rounding).
    act_order : bool
        Process columns by descending ``diag(H)`` (stable sort); outputs are in original order.
    objective : bool
        Compute the objective (one ``rows x cols x cols`` float64 product; callers that score
        the codes themselves skip it).
    factors : FeedbackFactors, optional
        Reuses the factorisation of ``H`` across calls; default: a fresh one.
    layer : str, optional
        Named in the warning of a retried factorisation (see the module).

    Returns
    -------
    codes : Tensor
        ``(rows, cols)`` uint8.
    Q : Tensor
        ``(rows, cols)`` dequantized weights (working dtype).
    objective : float or None
        :math:`\mathrm{tr}(\Delta W H \Delta W^T)` with the undamped ``H``; ``None`` when not
        asked for.

    Raises
    ------
    ValueError
        Shape mismatch, or ``H`` not finite.
    """
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"H has shape {tuple(H.shape)}; expected ({cols}, {cols}) for W {W.shape}")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W0 = W.detach().to(dtype)
    perm, U = (factors or _factorise)(H, gamma, act_order, dtype, W.device,
                                      lambda damping: warn_damped(layer, damping, factors))
    # worked on transposed, (cols, rows): each column is a contiguous row, so the per-column
    # updates stream through memory instead of striding across it
    Wt = W0[:, perm].T.contiguous()
    order = perm.tolist()  # original column index of each processing step

    codes = torch.empty(cols, rows, dtype=torch.uint8, device=W.device)
    Q = torch.empty(cols, rows, dtype=dtype, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = Wt[i1:i2], U[i1:i2, i1:i2]  # W1 is a view: updates land in Wt
        Err = torch.empty(i2 - i1, rows, dtype=dtype, device=W.device)
        for j in range(i2 - i1):
            c, q = quantize_column(W1[j].clone(), order[i1 + j])
            codes[i1 + j], Q[i1 + j] = c, q
            Err[j] = (W1[j] - Q[i1 + j]) / U1[j, j]
            W1[j + 1 :].addr_(U1[j, j + 1 :], Err[j], alpha=-1)  # rank-1, no temporary
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err, alpha=-1)
    codes, Q = codes.T, Q.T

    inv = torch.argsort(perm)
    codes, Q = codes[:, inv], Q[:, inv]
    if not objective:
        return codes, Q, None
    dW = (Q - W0).double()
    objective = float(((dW @ H.to(device=W.device, dtype=torch.float64)) * dW).sum())
    return codes, Q, objective


def uniform_column_quantizer(
    scale: Tensor, zero: Tensor, bits: int | Tensor, group_size: int | None = None
) -> QuantizeColumn:
    """Per-column rounding on a fixed uniform grid, decoded exactly as ``dequantize`` does.

    ``scale`` and ``zero`` are ``(rows, n_groups)`` (fp16, e.g. from ``design_uniform``);
    column ``c`` uses group ``c // group_size`` (group 0 when there is one group). ``bits`` is
    one width, or a ``(rows,)`` tensor of widths (stacked candidates).
    """

    # converted once, not per column: fp16 -> fp32 is exact, so the codes are round_uniform's
    s32, z32 = scale.float(), zero.float()

    def quantize_column(w: Tensor, col: int) -> tuple[Tensor, Tensor]:
        g = 0 if group_size is None or scale.shape[1] == 1 else col // group_size
        s, z = s32[:, g], z32[:, g]
        x = round_levels(w, s, z, bits)
        # the float32 arithmetic of dequantize(), so Q equals dequantize(BlockResult); abs_:
        # round() leaves -0.0 on (-0.5, 0), which the uint8 code decodes as +0.0
        return x.to(torch.uint8), x.float().abs_().sub_(z).mul_(s).to(w.dtype)

    return quantize_column


def gptq_gamma(H: Tensor, percdamp: float = 0.01) -> float:
    """GPTQ's damping ``percdamp * mean(diag H)`` for one ``(cols, cols)`` matrix."""
    return percdamp * float(H.diagonal().double().mean())


def codebook_column_quantizer(codebook: Tensor) -> QuantizeColumn:
    """Per-column nearest-level rounding onto fp16 codebook levels, decoded as ``dequantize`` does.

    ``codebook`` is sorted, ``(L,)`` shared or ``(rows, L)`` per row.
    """
    book = codebook.float()
    mids = (book[..., 1:] + book[..., :-1]) / 2

    def quantize_column(w: Tensor, col: int) -> tuple[Tensor, Tensor]:
        if book.dim() == 1:
            codes = torch.bucketize(w.float(), mids)
            q = book[codes]
        else:
            codes = torch.searchsorted(mids, w.float().unsqueeze(1)).squeeze(1)
            q = book.gather(1, codes.unsqueeze(1)).squeeze(1)
        return codes.to(torch.uint8), q.to(w.dtype)

    return quantize_column


def block_column_quantizer(block: BlockResult, r0: int, r1: int) -> QuantizeColumn:
    """The column quantizer of a ``BlockResult``'s grid or codebook, for its rows ``r0:r1``."""
    if block.quantizer == "uniform":
        return uniform_column_quantizer(block.scale[r0:r1], block.zero[r0:r1], block.bits,
                                        block.group_size)
    book = block.codebook if block.codebook.dim() == 1 else block.codebook[r0:r1]
    return codebook_column_quantizer(book)


def group_pieces(rows: tuple[int, int], per: int) -> Iterator[tuple[int, tuple[int, int]]]:
    """``(group, (a, b))`` for the groups of ``per`` rows meeting ``rows``; a, b block-relative."""
    r0, r1 = rows
    for g in range(r0 // per, (r1 - 1) // per + 1):
        yield g, (max(r0, g * per) - r0, min(r1, (g + 1) * per) - r0)


STACK_ELEMENTS = 1 << 24  # weights rounded in one stacked pass (64 MB of fp32 per copy)


def feedback_round_blocks(cands: Sequence[BlockResult], W: Tensor, H: Tensor, layer_rows: int,
                          damp: float = 0.01, act_order: bool = False,
                          factors: FeedbackFactors | None = None,
                          layer: str | None = None) -> list[BlockResult]:
    """Re-round each candidate's codes with error feedback under ``H`` on its own grid.

    The candidates are one block's (rows ``cands[i].rows`` of a layer with ``layer_rows``
    rows, held in ``W``) at several widths and grids. Error feedback acts on each row on its own,
    so the candidates are rounded together: ``W`` stacked once per candidate, one pass over the
    columns, each candidate's rows on its own grid (uniform grids of one group layout as one
    vectorised grid with a width per row). The column loop and its feedback updates run once per
    block instead of once per candidate; the codes equal those of rounding each candidate alone
    (up to the summation order of the stacked matrix products).

    ``H`` is ``(cols, cols)``, or ``(groups, cols, cols)`` for a grouped/depthwise conv, whose
    rows in the block are then rounded under their own group's matrix. Each matrix is damped
    relative to its own scale, ``gamma = damp * mean(diag H)`` (:func:`gptq_gamma`).
    ``factors`` reuses each matrix's factorisation across calls (:class:`FeedbackFactors`);
    ``layer`` is named in the warning of a retried factorisation.
    """
    if not cands:
        return []
    rows = cands[0].rows
    if any(c.rows != rows for c in cands):
        raise ValueError("feedback_round_blocks rounds candidates of one block: their rows "
                         f"differ ({sorted({c.rows for c in cands})})")
    groups = 1 if H.dim() == 2 else H.shape[0]
    per_stack = max(1, STACK_ELEMENTS // max(1, W.numel()))
    # candidates of one layout together (one vectorised grid), in chunks that bound the memory
    by_layout: dict[tuple, list[int]] = {}
    for i, c in enumerate(cands):
        by_layout.setdefault(_layout(c), []).append(i)
    chunks = [idx[k:k + per_stack] for idx in by_layout.values()
              for k in range(0, len(idx), per_stack)]
    pieces: list[list[Tensor]] = [[] for _ in cands]
    for g, (a, b) in group_pieces(rows, layer_rows // groups):
        Hg = H if H.dim() == 2 else H[g]  # H itself where possible: its factors are shared
        gamma = gptq_gamma(Hg, damp)
        for chunk in chunks:
            Ws = W[a:b].repeat(len(chunk), 1)
            quantizer = _stacked_quantizer([cands[i] for i in chunk], a, b)
            codes, _, _ = error_feedback_round(Ws, Hg, quantizer, gamma, act_order=act_order,
                                               objective=False, factors=factors, layer=layer)
            for i, c in zip(chunk, codes.split(b - a), strict=True):
                pieces[i].append(c)
    return [dataclasses.replace(c, codes=torch.cat(p)) for c, p in zip(cands, pieces, strict=True)]


def _layout(c: BlockResult) -> tuple:
    """Candidates with equal layouts stack into one vectorised uniform grid."""
    return (c.quantizer, c.group_size, None if c.scale is None else c.scale.shape[1])


def _stacked_quantizer(cands: Sequence[BlockResult], a: int, b: int) -> QuantizeColumn:
    """The column quantizer of candidates stacked row-wise, each on its rows ``a:b``."""
    if len({_layout(c) for c in cands}) == 1 and cands[0].quantizer == "uniform":
        n = b - a
        bits = torch.tensor([c.bits for c in cands],
                            device=cands[0].scale.device).repeat_interleave(n)
        return uniform_column_quantizer(torch.cat([c.scale[a:b] for c in cands]),
                                        torch.cat([c.zero[a:b] for c in cands]), bits,
                                        cands[0].group_size)
    each = [block_column_quantizer(c, a, b) for c in cands]

    def quantize_column(w: Tensor, col: int) -> tuple[Tensor, Tensor]:
        out = [q(part, col) for q, part in zip(each, w.split(b - a), strict=True)]
        return torch.cat([c for c, _ in out]), torch.cat([q for _, q in out])

    return quantize_column


def output_error(dW: Tensor, H: Tensor, rows: tuple[int, int], layer_rows: int) -> float:
    r""":math:`\mathrm{tr}(\Delta W H \Delta W^\top)` of a block, per group for a 3-D ``H``."""
    H = H if H.dim() == 3 else H.unsqueeze(0)
    return sum(float(row_output_errors(dW[a:b], H[g]).sum())
               for g, (a, b) in group_pieces(rows, layer_rows // H.shape[0]))


def row_output_errors(dW: Tensor, H: Tensor) -> Tensor:
    r"""Each row's :math:`\Delta W_i H \Delta W_i^\top` (float64) under a 2-D ``H``."""
    dW = dW.double()
    return ((dW @ H.double()) * dW).sum(1)
