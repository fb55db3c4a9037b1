r"""Sequential rounding with error feedback (OBS/GPTQ style) under an input-side precision.

One code path, two callers (see DESIGN "Whitening and the deployed risk"): BayesQ-kron rounds
under the Kronecker factor ``A`` with ``gamma = delta / mean(diag G)``, GPTQ under
``H = X X^T / n`` with ``gamma = 0.01 mean(diag H)`` (:func:`gptq_gamma`). Any quantizer plugs in
through a per-column callback; :func:`round_uniform_with_feedback` is the fixed uniform grid.

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

Algorithm, column by column in processing order (act-order: descending ``diag(H)``, stable):
``q_i = quantize(w_i)``; ``e_i = (w_i - q_i) / U_ii``; ``w_j -= e_i U_ij`` for every ``j > i``.

Dead columns (``diag(H) == 0``: the input is always zero there) get ``H[d, d] = 1`` as in GPTQ,
so the factorisation exists. Since a PSD ``H`` with a zero diagonal entry has a zero row and
column, such a column neither gives nor receives feedback: it is plain round-to-nearest.
(Unlike GPTQ the weight is kept, not zeroed: the layer's output does not depend on it.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quantizers import round_uniform

QuantizeColumn = Callable[[Tensor, int], tuple[Tensor, Tensor]]
"""``(w_col (rows,), original column index) -> (codes uint8 (rows,), q_col float (rows,))``."""

_NOT_PD = (
    "H + gamma*I is not positive definite ({what}); the rounding needs a positive definite "
    "damped matrix. Increase gamma (GPTQ uses gptq_gamma(H) = 0.01 * mean(diag H); try 10x "
    "that) or check H for negative eigenvalues (H must be symmetric PSD)."
)


def _upper_cholesky_of_inverse(H: Tensor) -> Tensor:
    """``U`` upper triangular with ``U^T U = H^{-1}``; a clear ``ValueError`` if ``H`` is not PD."""
    if not torch.isfinite(H).all():
        raise ValueError(_NOT_PD.format(what="H has non-finite entries"))
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info.item() != 0:
        raise ValueError(_NOT_PD.format(what=f"Cholesky failed at column {info.item() - 1}"))
    return U


def error_feedback_round(
    W: Tensor,
    H: Tensor,
    quantize_column: QuantizeColumn,
    gamma: float,
    block_size: int = 128,
    act_order: bool = False,
) -> tuple[Tensor, Tensor, float]:
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

    Returns
    -------
    codes : Tensor
        ``(rows, cols)`` uint8.
    Q : Tensor
        ``(rows, cols)`` dequantized weights (working dtype).
    objective : float
        :math:`\mathrm{tr}(\Delta W H \Delta W^T)` with the undamped ``H``.

    Raises
    ------
    ValueError
        Shape mismatch, or ``H + gamma I`` not positive definite (suggests a larger ``gamma``).
    """
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"H has shape {tuple(H.shape)}; expected ({cols}, {cols}) for W {W.shape}")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W0 = W.detach().to(dtype)
    Hd = H.detach().to(device=W.device, dtype=dtype).clone()
    dead = Hd.diagonal() == 0
    Hd[dead, dead] = 1.0
    perm = (torch.argsort(Hd.diagonal(), descending=True, stable=True) if act_order
            else torch.arange(cols, device=W.device))
    Wp, Hd = W0[:, perm].clone(), Hd[perm][:, perm]
    Hd.diagonal().add_(gamma)
    U = _upper_cholesky_of_inverse(Hd)
    order = perm.tolist()  # original column index of each processing step

    codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    Q = torch.empty(rows, cols, dtype=dtype, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = Wp[:, i1:i2], U[i1:i2, i1:i2]  # W1 is a view: updates land in Wp
        Err = torch.empty(rows, i2 - i1, dtype=dtype, device=W.device)
        for j in range(i2 - i1):
            c, q = quantize_column(W1[:, j].clone(), order[i1 + j])
            codes[:, i1 + j], Q[:, i1 + j] = c, q
            Err[:, j] = (W1[:, j] - Q[:, i1 + j]) / U1[j, j]
            W1[:, j + 1 :] -= Err[:, j : j + 1] * U1[j : j + 1, j + 1 :]
        Wp[:, i2:] -= Err @ U[i1:i2, i2:]

    inv = torch.argsort(perm)
    codes, Q = codes[:, inv], Q[:, inv]
    dW = (Q - W0).double()
    objective = float(((dW @ H.to(device=W.device, dtype=torch.float64)) * dW).sum())
    return codes, Q, objective


def grouped_conv_feedback(
    W: Tensor,
    H_groups: Tensor,
    quantizer_for_rows: Callable[[int, int], QuantizeColumn],
    gamma: float | Sequence[float],
    block_size: int = 128,
    act_order: bool = False,
) -> tuple[Tensor, Tensor, float]:
    """Error feedback per group of a grouped or depthwise Conv2d.

    Group ``g`` owns the output rows ``[g * rows/groups, (g+1) * rows/groups)`` of
    ``W = weight.flatten(1)`` and sees only its own input channels, so each group is an
    independent problem under its own ``H_groups[g]`` (as returned by :func:`input_hessian`).

    Parameters
    ----------
    W : Tensor
        ``(rows, cols)`` flattened conv weight, ``cols = in / groups * kh * kw``.
    H_groups : Tensor
        ``(groups, cols, cols)``.
    quantizer_for_rows : callable
        ``(row_start, row_stop) -> quantize_column`` for that group's rows (e.g. slicing per-row
        scales).
    gamma : float or sequence of float
        Damping, one for all groups or one per group.
    block_size, act_order
        As in :func:`error_feedback_round`, per group.

    Returns
    -------
    codes, Q, objective
        As in :func:`error_feedback_round`; the objective is the sum over groups.
    """
    groups = H_groups.shape[0]
    rows = W.shape[0]
    if H_groups.dim() != 3 or rows % groups:
        raise ValueError(f"H_groups {tuple(H_groups.shape)} must be (groups, cols, cols) with "
                         f"groups dividing rows={rows}")
    gammas = [float(gamma)] * groups if isinstance(gamma, (int, float)) else list(gamma)
    if len(gammas) != groups:
        raise ValueError(f"{len(gammas)} gamma values for {groups} groups")
    per = rows // groups
    parts = [
        error_feedback_round(W[g * per : (g + 1) * per], H_groups[g],
                             quantizer_for_rows(g * per, (g + 1) * per), gammas[g],
                             block_size, act_order)
        for g in range(groups)
    ]
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            sum(p[2] for p in parts))


def uniform_column_quantizer(
    scale: Tensor, zero: Tensor, bits: int, group_size: int | None = None
) -> QuantizeColumn:
    """Per-column rounding on a fixed uniform grid, decoded exactly as ``dequantize`` does.

    ``scale`` and ``zero`` are ``(rows, n_groups)`` (fp16, e.g. from ``design_uniform``);
    column ``c`` uses group ``c // group_size`` (group 0 when there is one group).
    """

    def quantize_column(w: Tensor, col: int) -> tuple[Tensor, Tensor]:
        g = 0 if group_size is None or scale.shape[1] == 1 else col // group_size
        s, z = scale[:, g], zero[:, g]
        codes = round_uniform(w, s, z, bits)
        # float32 arithmetic of dequantize(), so Q equals dequantize(BlockResult) bit for bit
        return codes, ((codes.float() - z.float()) * s.float()).to(w.dtype)

    return quantize_column


def round_uniform_with_feedback(
    W: Tensor,
    H: Tensor,
    scale: Tensor,
    zero: Tensor,
    bits: int,
    group_size: int | None = None,
    gamma: float | Sequence[float] | None = None,
    act_order: bool = False,
    block_size: int = 128,
) -> tuple[Tensor, Tensor, float]:
    """Error-feedback rounding onto a fixed uniform grid (GPTQ with static groups).

    The codes are representable by ``BlockResult(quantizer="uniform", scale=scale, zero=zero,
    group_size=group_size)``, and ``dequantize`` of that block equals ``Q.float()`` exactly.

    Parameters
    ----------
    W : Tensor
        ``(rows, cols)`` weights.
    H : Tensor
        ``(cols, cols)``, or ``(groups, cols, cols)`` for a grouped/depthwise conv (then error
        feedback runs per group, see :func:`grouped_conv_feedback`).
    scale, zero : Tensor
        fp16 ``(rows, n_groups)`` grid, used as stored.
    bits : int
        Bit-width of the grid.
    group_size : int, optional
        Columns per scale/zero; ``None`` for one per row.
    gamma : float or sequence of float, optional
        Damping; ``None`` uses :func:`gptq_gamma` (per group for a 3-D ``H``).
    act_order, block_size
        As in :func:`error_feedback_round`.
    """
    if H.dim() == 3:
        if gamma is None:
            gamma = [gptq_gamma(h) for h in H]
        return grouped_conv_feedback(
            W, H,
            lambda r0, r1: uniform_column_quantizer(scale[r0:r1], zero[r0:r1], bits, group_size),
            gamma, block_size, act_order,
        )
    if gamma is None:
        gamma = gptq_gamma(H)
    if not isinstance(gamma, (int, float)):
        raise TypeError("a 2-D H takes one float gamma; per-group gammas need a 3-D H")
    return error_feedback_round(W, H, uniform_column_quantizer(scale, zero, bits, group_size),
                                float(gamma), block_size, act_order)


def gptq_gamma(H: Tensor, percdamp: float = 0.01) -> float:
    """GPTQ's damping ``percdamp * mean(diag H)`` for one ``(cols, cols)`` matrix."""
    return percdamp * float(H.diagonal().double().mean())


def _conv_patches(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Input patches ``(N * L, in * kh * kw)`` in the column order of ``weight.flatten(1)``."""
    padding = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding,
                    stride=module.stride)  # (N, in*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@torch.no_grad()
def input_hessian(module: nn.Module, inputs_iter: Iterable[Tensor | tuple[Tensor, ...]]) -> Tensor:
    """GPTQ's input matrix ``H = X X^T / n`` of a layer over calibration inputs.

    ``n`` counts the rows of ``X^T``: input vectors for ``nn.Linear`` (every leading position,
    e.g. batch x tokens), patches for ``nn.Conv2d`` (images x output positions). So
    ``tr(dW H dW^T)`` is the mean squared output error per vector/patch. (The GPTQ reference
    uses ``2/n`` and counts images for convs; a constant factor that changes neither the rounding
    under ``gptq_gamma`` nor any comparison.) Accumulated in float64 on the inputs' device, returned as float32.

    Parameters
    ----------
    module : nn.Linear or nn.Conv2d
        The layer; only its hyperparameters are read.
    inputs_iter : iterable of Tensor
        The layer's inputs (a tuple, as forward hooks see them, uses its first element).

    Returns
    -------
    Tensor
        ``(in, in)`` for Linear, ``(cols, cols)`` for a Conv2d with ``groups == 1`` and
        ``(groups, cols, cols)`` otherwise, ``cols = in / groups * kh * kw``.
    """
    if isinstance(module, nn.Linear):
        groups, cols = 1, module.in_features
    elif isinstance(module, nn.Conv2d):
        groups = module.groups
        cols = module.in_channels // groups * module.kernel_size[0] * module.kernel_size[1]
    else:
        raise TypeError(f"input_hessian supports nn.Linear and nn.Conv2d, not {type(module)}")
    S: Tensor | None = None
    n = 0
    for x in inputs_iter:
        x = (x[0] if isinstance(x, (tuple, list)) else x).detach()
        if isinstance(module, nn.Conv2d):
            X = _conv_patches(module, x if x.dim() == 4 else x.unsqueeze(0))
        else:
            X = x.reshape(-1, cols)
        X = X.double().reshape(X.shape[0], groups, cols).transpose(0, 1)  # (g, n_b, cols)
        S = X.transpose(1, 2) @ X if S is None else S + X.transpose(1, 2) @ X
        n += X.shape[1]
    if S is None or n == 0:
        raise ValueError("input_hessian got no inputs")
    H = (S / n).float()
    return H[0] if groups == 1 else H


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


def block_column_quantizer(block, r0: int, r1: int) -> QuantizeColumn:
    """The column quantizer of a ``BlockResult``'s grid or codebook, for its rows ``r0:r1``."""
    if block.quantizer == "uniform":
        return uniform_column_quantizer(block.scale[r0:r1], block.zero[r0:r1], block.bits,
                                        block.group_size)
    book = block.codebook if block.codebook.dim() == 1 else block.codebook[r0:r1]
    return codebook_column_quantizer(book)


@torch.no_grad()
def layer_input_hessians(
    model: nn.Module, batches: Sequence, names: Sequence[str], reduce=None
) -> dict:
    """:func:`input_hessian` of every named layer over the calibration batches, in one pass.

    The inputs are recorded with forward hooks on the unmodified (dense) model, as in the OBC
    protocol; they are kept in memory until the pass ends. With ``reduce`` (a cross-process sum)
    each rank's mean is weighted by its sample count, so every rank gets the global mean.
    """
    from .posterior import LogitsModel, clone_fp32, inputs_to, split_batch

    net = LogitsModel(clone_fp32(model))
    device = next(net.parameters()).device
    modules = dict(net.model.named_modules())
    seen: dict[str, list[Tensor]] = {n: [] for n in names}
    hooks = [modules[n].register_forward_pre_hook(
        lambda _m, args, n=n: seen[n].append(args[0].detach())) for n in names]
    try:
        for batch in batches:
            x = inputs_to(split_batch(batch)[0], device, torch.float32)
            net(x)
    finally:
        for h in hooks:
            h.remove()
    hessians = {n: input_hessian(modules[n], seen[n]) for n in names}
    if reduce is not None:
        n_local = torch.tensor(float(sum(len(x) for x in seen[names[0]])), device=device)
        n_total = reduce(n_local.clone())
        hessians = {n: reduce(h * n_local) / n_total for n, h in hessians.items()}
    return hessians
