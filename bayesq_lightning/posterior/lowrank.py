r"""Low rank plus residual diagonal: :math:`\Lambda = \mathrm{diag}(d) + U S U^\top + \delta I` per layer.

laplace-torch's ``LowRankLaplace`` needs a git-only ``asdfghjkl``; this is our own, from
curvlinops' ``GGNLinearOperator`` and ``scipy.sparse.linalg.eigsh`` per layer (per-layer
eigenpairs keep block losses additive).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .base import LowRankLayerPosterior, Posterior
from .diag import fit_diag_prepared
from .fit import Prepared, Reduce, check_layers, import_laplace

DEFAULT_RANK = 8


def fit_lowrank(model: nn.Module, batches: list, layer_names: Sequence[str], *, n_data: int,
                prior_precision: str | float, backend: str, batch_size: int | None,
                reduce: Reduce | None, rank: int | None) -> Posterior:
    r"""Per-layer low-rank plus residual-diagonal posterior.

    For each layer, with :math:`H = s \sum_n J_n^\top \Lambda_n J_n` the GGN block of its weight
    (``s = n_data / n_calib``): :math:`(U, S)` = the top-``k`` eigenpairs of ``H`` from
    ``scipy.sparse.linalg.eigsh(which="LA")`` on curvlinops' ``GGNLinearOperator`` restricted to
    the weight, and the residual :math:`d = \max(\mathrm{diag}(H) - \mathrm{diag}(U S U^\top), 0)`
    with :math:`\mathrm{diag}(H)` the exact GGN diagonal of the diagonal fit, so
    :math:`\Lambda = \mathrm{diag}(d) + U S U^\top + \delta I` counts nothing twice and has the
    diagonal fit's diagonal. Since :math:`H - U S U^\top \succeq 0`, the clamp only removes
    round-off. :math:`\delta` is the diagonal fit's (marglik or given).

    With ``reduce``, the *operator* is reduced, not the eigenpairs: each matrix-vector product
    ``H v`` is the local product summed across processes. ``eigsh`` starts from the same
    deterministic ``v0`` everywhere and every process sees the same summed products, so all
    processes run the same Lanczos iterations and call ``reduce`` the same number of times, in
    the same order (layers in ``layer_names`` order).
    """
    t0 = time.perf_counter()
    prep = Prepared(model, batches, batch_size)
    check_layers(prep, layer_names)
    ranks, notes = {}, []
    for n in layer_names:
        size = prep.modules[n].weight.numel()
        if rank is None:
            ranks[n] = min(DEFAULT_RANK, size - 1)
            if ranks[n] < DEFAULT_RANK:
                notes.append(f"{n}: rank clamped to {ranks[n]} ({size} weights)")
        elif rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        elif rank >= size:
            raise ValueError(
                f"rank={rank} is not smaller than the {size} weights of layer {n!r} "
                "(eigsh needs k < n); pass a smaller rank, or rank=None to clamp per layer"
            )
        else:
            ranks[n] = rank
    fit = fit_diag_prepared(prep, layer_names, n_data=n_data, prior_precision=prior_precision,
                            backend=backend, reduce=reduce)
    factor = n_data / fit.n_total
    layers = {}
    for n in layer_names:
        weight = prep.modules[n].weight
        U, S = _top_eigenpairs(prep, weight, ranks[n], factor, reduce)
        h = fit.curvature[n].reshape(-1)
        low = (U.square() * S).sum(1)
        residual = (h - low).clamp_min(0)
        precision = (residual + low + fit.delta).view_as(weight)
        note = next((s.partition(": ")[2] for s in notes if s.startswith(f"{n}: ")), None)
        layers[n] = LowRankLayerPosterior(
            n, fit.layers[n].mean, precision, fit.delta, note=note, U=U, S=S,
            residual=residual.view_as(weight), curvature=(residual + low).view_as(weight),
        )
    return Posterior(
        layers=layers, structure="lowrank", prior_precision=fit.delta, n_data=n_data,
        n_calib=fit.n_total, backend=f"{fit.backend} diagonal + curvlinops GGN eigsh",
        labels=prep.labels, seconds=time.perf_counter() - t0,
        info={"notes": notes, "rank": ranks},
    )


def _top_eigenpairs(prep: Prepared, weight: nn.Parameter, k: int, factor: float,
                    reduce: Reduce | None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Top-``k`` eigenpairs of ``factor * GGN`` restricted to ``weight`` (flattened row-major).

    Returns ``U`` (n x k, float32, descending eigenvalues) and ``S`` (k,), clamped at 0.
    """
    import numpy as np

    import_laplace()  # curvlinops' import, without its dependencies' deprecation warnings
    from curvlinops import GGNLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    n = weight.numel()
    if k == 0:
        return weight.new_zeros(n, 0), weight.new_zeros(0)
    data = [(b, b["labels"]) if isinstance(b, Mapping) else tuple(b) for b in prep.loader]
    key = prep.dict_key_x
    op = GGNLinearOperator(
        prep.net, nn.CrossEntropyLoss(reduction="sum"), [weight], data,
        check_deterministic=False, num_data=prep.n_calib,
        batch_size_fn=(lambda x: x[key].shape[0]) if isinstance(data[0][0], Mapping) else None,
    )

    def matvec(v: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(v).reshape(-1), dtype=weight.dtype, device=weight.device)
        with torch.enable_grad():
            y = (op @ x).detach()
        if reduce is not None:
            y = reduce(y)
        return (y.double() * factor).cpu().numpy()

    lin = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(n)  # identical on every process
    with warnings.catch_warnings():  # torch loads its jvp decompositions via jit.script once
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated")
        try:
            vals, vecs = eigsh(lin, k=k, which="LA", v0=v0)
        except NotImplementedError as exc:  # an op without a forward-mode derivative
            raise ValueError(
                f"structure='lowrank' needs forward-mode derivatives of every op of the model, "
                f"and one has none ({str(exc).splitlines()[0]}); use structure='kron' or "
                "'diag', or for a HuggingFace model load it with attn_implementation='eager'"
            ) from exc
    order = np.argsort(vals)[::-1]
    U = torch.as_tensor(vecs[:, order].copy(), dtype=weight.dtype, device=weight.device)
    S = torch.as_tensor(vals[order].copy(), dtype=weight.dtype, device=weight.device)
    return U, S.clamp_min(0)
