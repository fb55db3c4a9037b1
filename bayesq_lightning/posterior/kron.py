r"""K-FAC Laplace: :math:`\Lambda = s\,(G \otimes A) + \delta I` per layer (laplace-torch ``KronLaplace``).

Stored with the scale folded into ``A`` and ``mean(diag G) = 1``; see :func:`fit_kron` for how
laplace-torch scales the factors and how several processes combine them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..input_stats import InputStats, finish_input_hessians, stream_input_stats
from ..layers import QUANTIZABLE
from .base import KronLayerPosterior, LayerPosterior, Posterior
from .diag import diag_core
from .fit import (
    Prepared,
    Reduce,
    backend_class,
    check_layers,
    import_laplace,
    is_grouped,
    laplace_fit,
)


def fit_kron(model: nn.Module, batches: list, layer_names: Sequence[str], *, n_data: int,
             prior_precision: str | float, backend: str, batch_size: int | None,
             reduce: Reduce | None, kfac_batches: int | None = None) -> Posterior:
    r"""K-FAC Laplace (laplace-torch ``KronLaplace`` with ``CurvlinopsGGN``).

    **The factors.** One curvlinops ``KFACLinearOperator`` runs over every K-FAC batch (loss
    ``CrossEntropyLoss(reduction="sum")``, ``num_data = N`` calibration samples) and sums in place:
    the output factor :math:`G = \sum_n g_n g_n^\top` (correction 1 for ``"sum"``) and the input
    factor :math:`A = \frac{1}{N T} \sum_n \sum_t x_{n,t} x_{n,t}^\top` (``T`` = number of conv
    output positions, 1 for Linear). :math:`G \otimes A` is the K-FAC approximation of the GGN
    *summed* over the ``N`` calibration samples -- the quantity the diagonal sums exactly, and
    what laplace-torch's own ``fit`` gives by building one operator and one ``Kron`` per batch
    (rescaling ``A`` by ``M / N``) and adding them, at three times the memory and one more
    forward per batch.

    **Rescaling.** :math:`\Lambda = \frac{n_\text{data}}{n_\text{calib}} G \otimes A + \delta I`.
    Then the split is normalised: :math:`c = \mathrm{mean}(\mathrm{diag}\,G)`,
    :math:`G \leftarrow G / c`, :math:`A \leftarrow c\,s\,A` (a layer with :math:`G = 0`,
    e.g. dead ReLUs, keeps :math:`G = 0`). Bias blocks (one dense factor, already a sum) are
    multiplied by ``s``. :math:`\delta` (scalar prior) is fitted by marginal likelihood on the
    eigenvalues of exactly these factors (:mod:`.marglik`), so it belongs to the stored
    posterior.

    **Several processes.** Summing the factors as computed is wrong: each shard's ``A_r`` is
    divided by its own ``N_r``. Each process multiplies ``A_r`` back by ``N_r`` (the
    unnormalised per-sample sum), sums ``G_r``, ``N_r A_r``, bias blocks and ``N_r`` across
    processes (each tensor once: a bias block holds its weight's ``G``, and an all-reduce sums in
    place), then divides the summed ``A`` by :math:`\sum_r N_r` -- exactly the factors of a
    single fit over all samples.

    **Layers.** K-FAC covers ``nn.Linear`` and ungrouped ``nn.Conv2d`` layers (every other
    parameter is frozen for the fit, on the fp32 clone). Grouped and depthwise convolutions get
    the *diagonal metric* (exact GGN diagonal from :func:`~bayesq_lightning.posterior.diag.diag_core`, rescaled, plus the
    K-FAC :math:`\delta`) with a note: curvlinops averages their input patches over the channel
    groups and shares one ``A`` across groups, which is not the per-group statistic the
    error-feedback rounding needs. :math:`\delta` is fitted on the K-FAC layers only.

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
    from laplace.utils import Kron

    t0 = time.perf_counter()
    k = len(batches) if kfac_batches is None else min(kfac_batches, len(batches))
    prep = Prepared(model, batches[:k], batch_size)
    check_layers(prep, layer_names)
    kfac_modules = {n: m for n, m in prep.modules.items()
                    if isinstance(m, QUANTIZABLE) and not is_grouped(m)}
    if not kfac_modules:
        kinds = sorted({type(m).__name__ for m in prep.net.model.modules()
                        if list(m.parameters(False))})
        raise ValueError(
            "structure='kron' needs at least one nn.Linear or ungrouped nn.Conv2d layer (the "
            f"only layers K-FAC supports); this model has parameterised layers {kinds}. "
            "Use structure='diag' (or 'lowrank') for it."
        )
    backend, choice = prep.backend(backend)
    stochastic = backend_class(backend)[1]
    notes: list[str] = []

    abort = ("laplace-torch aborted the K-FAC fit: the eigendecomposition of a Kronecker "
             "factor failed ({exc}); the curvature is probably not finite. Check the model's "
             "outputs on the calibration data and normalise the inputs as in training.")

    stream = k < len(batches)
    if reduce is not None:  # all processes stream if one does: the reduce calls pair up
        stream = float(reduce(torch.tensor(float(stream), device=prep.device))) > 0
    # (not a 1x1 weight without bias: laplace-torch folds its A into a single block)
    stream_modules = {n: m for n, m in kfac_modules.items()
                      if m.weight.numel() > 1 or m.bias is not None} if stream else {}
    # the input sums over the batches beyond the K-FAC fit's first (forward passes only), then
    # in fp32 (the fit holds its factors and activations beside them) while the fit's own
    # forward passes add its batches' inputs: every batch passes the network once for A
    stats = stream_input_stats(prep.net, prep.device, stream_modules,
                               batches[k:] if stream_modules else [])  # no hooks: no pass
    for st in stats.values():
        st.sum_in_float32()
    A_all: dict[str, torch.Tensor] = {}
    bias_eig: dict[int, torch.Tensor] = {}  # block index -> spectrum of a bias block
    g_eig: dict[int, torch.Tensor] = {}  # id(G) -> spectrum of a weight's normalised G

    def kfac(la) -> None:
        """One curvlinops K-FAC operator over every K-FAC batch, its factors summed in place.

        laplace-torch's ``fit`` builds an operator and a ``Kron`` per batch, adds them into new
        tensors and runs one more forward per batch for a loss; the factors are the same
        (``A`` a mean over all ``N`` samples, ``G`` a sum), at a fraction of the memory."""
        be = la.backend
        dicts = isinstance(prep.data[0], Mapping)
        data = _WithLabels(prep.loader) if dicts else prep.loader
        # the streamed layers' inputs go to their sums instead of the operator's own A (memory
        # and time of a second copy); the operator is handed the finished A
        names = {id(m): n for n, m in la.model.named_modules()}
        skip = {names[id(kfac_modules[n])]: n for n in stats}
        op = _kfac_operator_class()(
            la.model, be.lossfunc, la.params, data, fisher_type=be._kron_fisher_type,
            separate_weight_and_bias=True, check_deterministic=False, num_data=prep.n_calib,
            **({"batch_size_fn": lambda x: x[prep.dict_key_x].shape[0]} if dicts else {}))
        op.input_stats = {cname: stats[n] for cname, n in skip.items()}
        op.compute_kronecker_factors()
        A_all.update(finish_input_hessians(stats, batches, reduce))
        for cname, n in skip.items():
            op._input_covariances[cname] = A_all[n]
        la.H_facs = be._get_kron_factors(op)

    def rescale(la) -> int:
        # A over every batch's input rows, already combined across processes: left alone
        handed = {id(A) for A in A_all.values()}
        streamed = {i for i, F in enumerate(la.H_facs.kfacs) if len(F) == 2 and id(F[1]) in handed}
        A_all.clear()  # the factors hold them now
        kfacs, n_total = _combine_kfacs(la, prep.n_calib, reduce, keep_inputs=streamed)
        # after the reduce: one rank's overflow reaches every rank, so all raise together
        if not all(torch.isfinite(f).all() for F in kfacs for f in F):
            raise RuntimeError(
                "the K-FAC fit produced Kronecker factors with NaN or inf entries; the curvature "
                "is probably not finite. Check the model's outputs on the calibration data and "
                "normalise the inputs as in training.")
        factor = n_data / n_total
        # a bias block holds its weight's G object: its spectrum (of s G) is taken now, before
        # that G is normalised in place, instead of keeping a second out x out copy for it
        weights_g = {id(F[0]) for F in kfacs if len(F) == 2}
        try:
            for i, F in enumerate(kfacs):
                if len(F) == 1 and id(F[0]) in weights_g and prior_precision == "marglik":
                    bias_eig[i] = _eigvalsh(F[0] * factor)
        except torch.linalg.LinAlgError as exc:
            raise RuntimeError(abort.format(exc=exc)) from None
        g_of_bias = {id(kfacs[i][0]): i for i in bias_eig}
        for F in kfacs:
            if len(F) == 2:
                c = F[0].diagonal().mean()
                if id(F[0]) in g_of_bias:  # the same spectrum, scaled: not a second solve
                    g_eig[id(F[0])] = bias_eig[g_of_bias[id(F[0])]] / (
                        factor * (c if c > 0 else 1.0))
                if c > 0:
                    F[0].div_(c)
                F[1].mul_(c * factor if c > 0 else factor)
            elif id(F[0]) not in weights_g:
                F[0] = F[0] * factor
        la.H_facs = Kron(kfacs)  # bias blocks: their weight's normalised G (spectrum only)
        return n_total

    def spectrum(la) -> list:  # the eigenvalues of G (x) A are the products of the factors'
        try:
            eig = [[bias_eig[i]] if i in bias_eig else
                   [g_eig[id(f)] if id(f) in g_eig else _eigvalsh(f) if f.dim() > 1 else f
                    for f in F]
                   for i, F in enumerate(la.H_facs.kfacs)]
        except torch.linalg.LinAlgError as exc:
            raise RuntimeError(abort.format(exc=exc)) from None
        return [tuple(e) if len(e) == 2 else e[0] for e in eig]

    fit = laplace_fit(
        prep, list(kfac_modules.values()), hessian_structure="kron", backend_cls=CurvlinopsGGN,
        stochastic=stochastic, prior_precision=prior_precision, n_data=n_data, rescale=rescale,
        spectrum=spectrum, abort=abort, fit=kfac,
    )
    delta, n_total = fit.delta, fit.n_total

    wanted = set(layer_names)
    layers: dict[str, LayerPosterior] = {}
    for pname, p, F in zip(fit.names, fit.params, fit.la.H_facs.kfacs, strict=True):
        lname, _, kind = pname.rpartition(".")
        if kind != "weight" or lname not in wanted:
            continue
        out, n_in = p.shape[0], p[0].numel()
        if len(F) == 2:
            # the fit's own tensors (rescaled copies, nobody else's): no second copy
            G, A = F[0].detach(), F[1].detach()
        else:  # laplace-torch folds a 1x1 weight without bias into one scalar block
            G, A = torch.ones_like(F[0]).reshape(1, 1), F[0].detach().reshape(1, 1).clone()
        if G.shape != (out, out) or A.shape != (n_in, n_in):
            raise RuntimeError(
                f"K-FAC factors of {lname!r} have shapes G {tuple(G.shape)}, A {tuple(A.shape)}; "
                f"expected ({out}, {out}) and ({n_in}, {n_in}) (parameter order mismatch)"
            )
        # the mean is the private fp32 copy's parameter, dropped with the copy otherwise;
        # the precision is formed from G, A and delta when read
        layers[lname] = KronLayerPosterior(lname, p.detach(), None, delta, A=A, G=G)

    grouped = [n for n in layer_names if n not in layers and is_grouped(prep.modules[n])]
    backend_name = f"CurvlinopsGGN(stochastic={stochastic}) K-FAC{choice}"
    if grouped:
        diag = diag_core(prep, grouped, n_data=n_data, prior_precision=1.0, backend=backend,
                         reduce=reduce)
        backend_name += f"; grouped convs: {diag.backend} diagonal"
        for n in grouped:
            note = (f"grouped Conv2d (groups={prep.modules[n].groups}): diagonal metric, "
                    "K-FAC shares one input factor across groups")
            notes.append(f"{n}: {note}")
            layers[n] = LayerPosterior(n, diag.layers[n].mean, diag.curvature[n] + delta, delta,
                                       note=note, curvature=diag.curvature[n])
    missing = wanted - set(layers)
    if missing:
        raise RuntimeError(f"no curvature was produced for layers {sorted(missing)}")
    return Posterior(
        layers={n: layers[n] for n in layer_names}, structure="kron", prior_precision=delta,
        n_data=n_data, n_calib=n_total, backend=backend_name, labels=prep.labels,
        seconds=time.perf_counter() - t0,
        info={"notes": notes, "kfac_normalisation": "mean(diag G) = 1",
              "kfac_batches": k, "input_factor_batches": len(batches) if stream else k},
    )


def _eigvalsh(f: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric factor; in float64 where fp32 LAPACK fails to converge.

    A low-rank output factor (e.g. 1000 classes, 80 samples: hundreds of zero eigenvalues) can
    make MKL's fp32 ``syevd`` fail to converge, depending on the thread count (seen on ResNet-50
    with one thread): the float64 solve of the same matrix is the fallback.
    """
    try:
        e = torch.linalg.eigvalsh(f)
        if bool(torch.isfinite(e).all()):
            return e
    except torch.linalg.LinAlgError:
        pass
    return torch.linalg.eigvalsh(f.double()).to(f.dtype)


def _combine_kfacs(la, n_local: int, reduce: Reduce | None, keep_inputs: set[int] = frozenset()
                   ) -> tuple[list[list[torch.Tensor]], int]:
    r"""Kronecker factors and sample count summed over processes (in place).

    Returns factors with :math:`G = \sum_n g g^\top` and :math:`A = \frac{1}{N} \sum_n x x^\top`
    over *all* ``N`` samples (see :func:`fit_kron`) and ``N``. The ``A`` of the blocks
    ``keep_inputs`` (streamed, already combined across processes) is left alone.
    """
    kfacs = [list(F) for F in la.H_facs.kfacs]  # computed without autograd: nothing to detach
    if reduce is None:
        return kfacs, n_local
    device = kfacs[0][0].device
    # a bias block holds its weight's G object; the input is kept so that its id stays unique
    reduced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for b, F in enumerate(kfacs):
        kept = b in keep_inputs
        if len(F) == 2 and not kept:
            F[1] = F[1] * n_local  # back to the unnormalised per-sample sum
        for i, f in enumerate(F[:1] if kept else F):  # each tensor once: all-reduce is in place
            if id(f) not in reduced:
                reduced[id(f)] = (f, reduce(f))
            F[i] = reduced[id(f)][1]
    n_total = int(reduce(torch.tensor(float(n_local), device=device)).item())
    for b, F in enumerate(kfacs):
        if len(F) == 2 and b not in keep_inputs:
            F[1] = F[1] / n_total
    return kfacs, n_total


def _kfac_operator_class() -> type:
    r"""curvlinops' ``KFACLinearOperator`` with three changes that leave its factors as they are.

    * The modules named in ``input_stats`` add their inputs to those :class:`InputStats`
      (K-FAC's ``A`` streamed over every batch) instead of to the operator's own input
      covariance. Should curvlinops rename the hook, the override is never called, and the
      streamed ``A`` then lacks the K-FAC batches' inputs: a test checks that they are counted.
    * The exact GGN of a two-class cross-entropy takes one backward pass instead of two. The
      loss Hessian in the logits, :math:`\mathrm{diag}(p) - p p^\top`, has rank
      :math:`C - 1`; for :math:`C = 2` it is :math:`v v^\top` with
      :math:`v = \sqrt{p_0 p_1}\,(1, -1)`, so one backward pass along ``v`` gives the same
      output factor ``G`` as curvlinops' two columns of its square root (to rounding).
    * That pass, and the Monte-Carlo GGN's, ask for each layer's bias gradient where it has a
      bias, not its weight's: the output factors are the same, bit for bit, without the
      weight gradients' matrix products.
    """
    from curvlinops import KFACLinearOperator
    from curvlinops.kfac import FisherType
    from torch.autograd import grad

    class SkipInputKFAC(KFACLinearOperator):
        input_stats: dict[str, InputStats] = {}

        def _hook_accumulate_input_covariance(self, module, inputs, module_name: str) -> None:
            if module_name in self.input_stats:
                self.input_stats[module_name].add(inputs)
            else:
                super()._hook_accumulate_input_covariance(module, inputs, module_name)

        def _backward(self, scalar: torch.Tensor, retain_graph: bool) -> None:
            # G reads the gradients of the layers' outputs, which its hooks see on the way: a
            # layer's bias gradient (a sum of that output gradient) forces them as surely as
            # its weight's, without the weight gradient's matrix product
            targets = [self._params[pos.get("bias", pos.get("weight"))]
                       for pos in self._mapping.values()]
            grad(scalar, targets, retain_graph=retain_graph)

        def _compute_loss_and_backward(self, output: torch.Tensor, y: torch.Tensor) -> None:
            if self._fisher_type == FisherType.MC and output.ndim == 2:
                for mc in range(self._mc_samples):  # curvlinops' Monte-Carlo GGN
                    loss = self._loss_func(output, self.draw_label(output))
                    self._backward(self._maybe_adjust_loss_scale(loss, output),
                                   retain_graph=mc < self._mc_samples - 1)
                return None
            if not (self._fisher_type == FisherType.TYPE2 and output.ndim == 2
                    and output.shape[1] == 2
                    and type(self._loss_func) is nn.CrossEntropyLoss):
                return super()._compute_loss_and_backward(output, y)
            p = output.detach().softmax(dim=1)
            v = (p[:, 0] * p[:, 1]).sqrt().unsqueeze(1) * output.new_tensor([1.0, -1.0])
            if self._loss_func.reduction == "mean":  # curvlinops' scaling of its square root
                v = v / output.shape[0]
            self._backward((output * v).sum(), retain_graph=False)
            return None

    return SkipInputKFAC


class _WithLabels:
    """``(batch, batch["labels"])`` for each dict batch of a loader, re-iterable, one at a time."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __iter__(self):
        return ((b, b["labels"]) for b in self.loader)

    def __len__(self) -> int:
        return len(self.loader)
