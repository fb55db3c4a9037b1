r"""K-FAC Laplace: :math:`\Lambda = s\,(G \otimes A) + \delta I` per layer (laplace-torch ``KronLaplace``).

Stored with the scale folded into ``A`` and ``mean(diag G) = 1``; the factors' algebra is
:class:`~bayesq_lightning.posterior.kron_factors.KronFactors`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..input_stats import InputStats, stream_input_stats
from ..layers import QUANTIZABLE
from .base import KronLayerPosterior, LayerPosterior, Posterior
from .diag import fit_diag_prepared
from .fit import (
    LaplaceFit,
    Prepared,
    Reduce,
    backend_class,
    check_layers,
    import_laplace,
    is_grouped,
    laplace_fit,
)
from .kron_factors import KronFactors
from .marglik import Spectrum, resolved

ABORT = ("laplace-torch aborted the K-FAC fit: the eigendecomposition of a Kronecker "
         "factor failed ({exc}); the curvature is probably not finite. Check the model's "
         "outputs on the calibration data and normalise the inputs as in training.")


def fit_kron(model: nn.Module, batches: list, layer_names: Sequence[str], *, n_data: int,
             prior_precision: str | float, backend: str, batch_size: int | None,
             reduce: Reduce | None, kfac_batches: int | None = None) -> Posterior:
    r"""K-FAC Laplace (laplace-torch ``KronLaplace`` with ``CurvlinopsGGN``).

    **The factors** (:class:`~bayesq_lightning.posterior.kron_factors.KronFactors`): one
    curvlinops K-FAC operator over every K-FAC batch gives ``G`` (summed over the calibration
    samples) and ``A`` (their mean), :math:`G \otimes A` the K-FAC approximation of the GGN
    summed over the samples, as the diagonal sums exactly. Several processes sum them exactly
    (:meth:`~.KronFactors.combine`); then :math:`\Lambda = \frac{n_\text{data}}{n_\text{calib}}
    G \otimes A + \delta I`, stored with ``mean(diag G) = 1`` (:meth:`~.KronFactors.normalise`).
    :math:`\delta` (scalar prior) is fitted by marginal likelihood on the eigenvalues of exactly
    these factors (:mod:`.marglik`), so it belongs to the stored posterior.

    **Layers.** K-FAC covers ``nn.Linear`` and ``nn.Conv2d`` layers (every other parameter is
    frozen for the fit, on the fp32 clone). A grouped or depthwise convolution gets one input
    factor per channel group, ``A`` of shape ``(groups, cols, cols)``
    (:class:`~bayesq_lightning.posterior.base.KronLayerPosterior`): its inputs are always
    summed by :class:`~bayesq_lightning.input_stats.InputStats` group by group, as GPTQ sums
    them, instead of by curvlinops, which averages the patches over the groups into one shared
    ``A``; curvlinops' ``G`` (the output gradients' statistic) does not depend on the groups.

    **Input factors from every batch.** ``G`` needs backward passes (one per class for the exact
    GGN, one for two classes), ``A`` only the layer inputs. With ``kfac_batches`` below the
    number of batches (per process; if any process has more, all stream), the K-FAC fit runs on
    the first ``kfac_batches`` and ``A`` is the mean of :math:`x x^\top` over the input rows of
    *every* batch, summed with GPTQ's statistics code
    (:class:`~bayesq_lightning.input_stats.InputStats`): the later batches streamed first
    (:func:`~bayesq_lightning.input_stats.stream_input_stats`), the fit's own batches from its own
    forward passes, so every batch passes the network once and more calibration data costs
    forward passes only; :math:`s` and ``Posterior.n_calib`` count the samples of the K-FAC fit,
    which ``G`` sums (``info["input_factor_batches"]`` the batches ``A`` averages). A module
    called several times per forward (shared blocks) gets curvlinops' *sum* over its calls from
    the K-FAC fit but the *mean* over its calls from the stream.
    """
    import_laplace()
    from laplace.curvature import CurvlinopsGGN

    t0 = time.perf_counter()
    n_kfac = len(batches) if kfac_batches is None else min(kfac_batches, len(batches))
    prep = Prepared(model, batches[:n_kfac], batch_size)
    check_layers(prep, layer_names)
    kfac_modules = _kfac_modules(prep)
    backend, choice = prep.backend(backend)
    stochastic = backend_class(backend)[1]
    stream = n_kfac < len(batches)
    if reduce is not None:  # all processes stream if one does: the reduce calls pair up
        stream = float(reduce(torch.tensor(float(stream), device=prep.device))) > 0
    streamed = _streamed_inputs(prep, kfac_modules, batches[n_kfac:], stream)
    steps = _KronSteps(prep, batches, streamed, reduce, n_data)
    fit = laplace_fit(
        prep, list(kfac_modules.values()), hessian_structure="kron", backend_cls=CurvlinopsGGN,
        stochastic=stochastic, prior_precision=prior_precision, n_data=n_data,
        rescale=steps.rescale, spectrum=steps.spectrum, abort=ABORT, fit=steps.fit,
        defer=steps.deferred_spectrum,
    )
    layers = _kron_layers(fit, steps.factors, layer_names, prep)
    notes: list[str] = []
    backend_name = f"CurvlinopsGGN(stochastic={stochastic}) K-FAC{choice}"
    embeddings = [n for n in layer_names
                  if n not in layers and isinstance(prep.modules[n], nn.Embedding)]
    if embeddings:
        # the diagonal metric adds delta to its curvature: the deferred solve runs here
        backend_name += _embedding_diagonal(prep, embeddings, layers, notes,
                                            delta=resolved(fit.delta),
                                            n_data=n_data, backend=backend, reduce=reduce)
    missing = set(layer_names) - set(layers)
    if missing:
        raise RuntimeError(f"no curvature was produced for layers {sorted(missing)}")
    return Posterior(
        layers={n: layers[n] for n in layer_names}, structure="kron", prior_precision=fit.delta,
        n_data=n_data, n_calib=fit.n_total, backend=backend_name, labels=prep.labels,
        seconds=time.perf_counter() - t0,
        info={"notes": notes, "kfac_normalisation": "mean(diag G) = 1",
              "kfac_batches": n_kfac, "input_factor_batches": len(batches) if stream else n_kfac},
    )


@dataclass
class _KronSteps:
    """:func:`~.fit.laplace_fit`'s ``fit``, ``rescale`` and ``spectrum`` for K-FAC: one
    :class:`~.kron_factors.KronFactors` accumulated, combined, normalised and decomposed."""

    prep: Prepared
    batches: list
    streamed: dict[str, InputStats]
    reduce: Reduce | None
    n_data: int
    factors: KronFactors | None = None

    def fit(self, la) -> None:
        self.factors = KronFactors.accumulate(la, self.prep, self.streamed, self.batches,
                                              self.reduce)

    def rescale(self, la) -> int:
        self.factors.combine(self.reduce)
        self.factors.check_finite()  # after the reduce: all processes raise together
        self.factors.normalise(self.n_data)
        la.H_facs = self.factors.to_laplace()
        return self.factors.n_samples

    def spectrum(self, la) -> Spectrum:
        return self.deferred_spectrum()()

    def deferred_spectrum(self) -> Callable[[], Spectrum]:
        """The spectrum as a closure over the factors alone (not the network and batches this
        object holds), for the deferred marginal-likelihood solve."""
        factors = self.factors

        def spectrum() -> Spectrum:
            with _failed_eigensolve_aborts():
                return factors.spectrum()

        return spectrum


@contextmanager
def _failed_eigensolve_aborts() -> Iterator[None]:
    try:
        yield
    except torch.linalg.LinAlgError as exc:
        raise RuntimeError(ABORT.format(exc=exc)) from None


def _kfac_modules(prep: Prepared) -> dict[str, nn.Module]:
    """The layers K-FAC covers, by name: ``nn.Linear`` and ``nn.Conv2d`` (grouped ones too)."""
    modules = {n: m for n, m in prep.modules.items() if isinstance(m, QUANTIZABLE)}
    if not modules:
        kinds = sorted({type(m).__name__ for m in prep.net.model.modules()
                        if list(m.parameters(False))})
        raise ValueError(
            "structure='kron' needs at least one nn.Linear or nn.Conv2d layer (the only layers "
            f"K-FAC supports); this model has parameterised layers {kinds}. Use "
            "structure='diag' for it."
        )
    return modules


def _streamed_inputs(prep: Prepared, kfac_modules: dict[str, nn.Module], later: list,
                     stream: bool) -> dict[str, InputStats]:
    """The input sums of the layers whose ``A`` is streamed, over the ``later`` batches; a
    grouped convolution's always (its ``A`` per group, see :func:`fit_kron`).

    Forward passes only; the sums are then held in fp32 (the fit holds its factors and
    activations beside them) while the K-FAC fit's own forward passes add its batches' inputs:
    every batch passes the network once for ``A``. Not a ``1 x 1`` weight without bias:
    laplace-torch folds its ``A`` into a single block.
    """
    modules = {n: m for n, m in kfac_modules.items()
               if is_grouped(m) or stream and (m.weight.numel() > 1 or m.bias is not None)}
    stats = stream_input_stats(prep.net, prep.device, modules,
                               later if modules else [])  # no hooks: no pass
    for st in stats.values():
        st.sum_in_float32()
    return stats


def _kron_layers(fit: LaplaceFit, factors: KronFactors, layer_names: Sequence[str],
                 prep: Prepared) -> dict[str, LayerPosterior]:
    """The K-FAC posterior of every requested weight the fit covered."""
    wanted = set(layer_names)
    layers: dict[str, LayerPosterior] = {}
    for i, (pname, p, _) in enumerate(zip(fit.names, fit.params, factors.blocks, strict=True)):
        lname, _, kind = pname.rpartition(".")
        if kind != "weight" or lname not in wanted:
            continue
        out, n_in = p.shape[0], p[0].numel()
        G, A = factors.layer_factors(i)
        groups = prep.modules[lname].groups if is_grouped(prep.modules[lname]) else 1
        if G.shape != (out, out) or A.shape != ((n_in, n_in) if groups == 1
                                                else (groups, n_in, n_in)):
            raise RuntimeError(
                f"K-FAC factors of {lname!r} have shapes G {tuple(G.shape)}, A {tuple(A.shape)}; "
                f"expected ({out}, {out}) and ({n_in}, {n_in}) (parameter order mismatch)"
            )
        # the mean is the private fp32 copy's parameter, dropped with the copy otherwise;
        # the precision is formed from G, A and delta when read
        layers[lname] = KronLayerPosterior(lname, p.detach(), None, fit.delta, A=A, G=G)
    return layers


def _embedding_diagonal(prep: Prepared, names: list[str], layers: dict[str, LayerPosterior],
                        notes: list[str], *, delta: float, n_data: int, backend: str,
                        reduce: Reduce | None) -> str:
    """The diagonal metric of the embeddings ``names`` with K-FAC's ``delta`` (curvlinops'
    K-FAC has no Embedding support), added to ``layers`` (and ``notes``); returns the
    backend's description."""
    diag = fit_diag_prepared(prep, names, n_data=n_data, prior_precision=1.0, backend=backend,
                             reduce=reduce)
    note = "Embedding: diagonal metric (curvlinops' K-FAC has no Embedding support)"
    for n in names:
        notes.append(f"{n}: {note}")
        layers[n] = LayerPosterior(n, diag.layers[n].mean, diag.curvature[n] + delta, delta,
                                   note=note, curvature=diag.curvature[n])
    return f"; embeddings: {diag.backend} diagonal"
