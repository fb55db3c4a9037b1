r"""Diagonal Laplace: :math:`\Lambda = s\,\mathrm{diag}(\mathrm{GGN}) + \delta`, ``s = n_data / n_calib``.

The diagonal fit also serves the low-rank structure (its residual diagonal) and K-FAC's
fallback for grouped convolutions, so the fit on a prepared network (:func:`fit_diag_prepared`)
returns the rescaled curvature beside the per-layer posteriors.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import QUANTIZABLE, is_embedding
from .base import LayerPosterior, Posterior
from .fit import Prepared, Reduce, backend_class, global_count, import_laplace, laplace_fit


@dataclass
class DiagFit:
    """Result of the diagonal Laplace fit, shared by ``diag``, ``lowrank`` and kron's fallback."""

    layers: dict[str, LayerPosterior]  # per requested layer (precision incl. delta)
    curvature: dict[str, torch.Tensor]  # rescaled GGN diagonal per requested layer (weight-shaped)
    delta: float
    n_total: int
    backend: str


def fit_diag_prepared(
    prep: Prepared,
    layer_names: Sequence[str],
    *,
    n_data: int,
    prior_precision: str | float,
    backend: str,
    reduce: Reduce | None,
) -> DiagFit:
    r"""Diagonal GGN Laplace on ``prep.net``: :math:`\Lambda = s\,\mathrm{diag}(\mathrm{GGN}) + \delta`.

    Curvature only where it is used: Linear/Conv2d parameters; everything else frozen (ASDL
    rejects trainable parameters of modules it does not support). laplace-torch's diagonal sums
    per-sample curvature and loss, so both are summed across processes as they are, then
    multiplied by :math:`s = n_\text{data} / n_\text{calib}`.
    """
    import_laplace()
    from laplace import curvature as curv

    wanted = set(layer_names)
    backend, choice = prep.backend(backend)
    cls_name, stochastic = backend_class(backend)

    def rescale(la) -> int:
        H = la.H.detach()
        loss = torch.as_tensor(la.loss, dtype=torch.float64)
        if reduce is not None:
            H = reduce(H.clone())
            loss = reduce(loss.clone().to(H.device))
        n_total = global_count(prep.n_calib, reduce, H.device)
        factor = n_data / n_total
        la.H = H * factor
        la.loss = loss.to(H.dtype) * factor
        return n_total

    fit = laplace_fit(
        prep, [m for n, m in prep.modules.items() if isinstance(m, QUANTIZABLE)
               or (n in wanted and is_embedding(m))],
        hessian_structure="diag", backend_cls=getattr(curv, cls_name), stochastic=stochastic,
        prior_precision=prior_precision, n_data=n_data, rescale=rescale,
        spectrum=lambda la: [la.H],
        abort="laplace-torch aborted the posterior fit ({exc}); check the model's outputs on "
              "the calibration data for NaN/inf",
    )
    precision = fit.la.posterior_precision.detach()
    curvature = fit.la.H.detach()

    sizes = [p.numel() for p in fit.params]
    layers, curv_out = {}, {}
    for pname, p, lam, h in zip(fit.names, fit.params, torch.split(precision, sizes),
                                torch.split(curvature, sizes), strict=True):
        lname, _, kind = pname.rpartition(".")
        if kind == "weight" and lname in wanted:
            curv_out[lname] = h.view_as(p).clone()
            layers[lname] = LayerPosterior(lname, p.detach().clone(), lam.view_as(p).clone(),
                                           fit.delta, curvature=curv_out[lname])
    missing = wanted - set(layers)
    if missing:
        raise RuntimeError(f"no curvature was produced for layers {sorted(missing)}")
    return DiagFit(layers, curv_out, fit.delta, fit.n_total,
                   f"{cls_name}(stochastic={stochastic}){choice}")


def fit_diag(model: nn.Module, batches: list, layer_names: Sequence[str], *, n_data: int,
             prior_precision: str | float, backend: str, batch_size: int | None,
             reduce: Reduce | None) -> Posterior:
    """The diagonal posterior of ``layer_names`` (see :func:`fit_diag_prepared`)."""
    t0 = time.perf_counter()
    prep = Prepared(model, batches, batch_size)
    fit = fit_diag_prepared(prep, layer_names, n_data=n_data, prior_precision=prior_precision,
                            backend=backend, reduce=reduce)
    return Posterior(
        layers={n: fit.layers[n] for n in layer_names}, structure="diag",
        prior_precision=fit.delta, n_data=n_data, n_calib=fit.n_total, backend=fit.backend,
        labels=prep.labels, seconds=time.perf_counter() - t0,
    )
