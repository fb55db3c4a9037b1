r"""Gaussian posterior over the weights of the quantizable layers, fitted with laplace-torch.

What the posterior stands for. It is the *training-set* posterior with its curvature estimated on
the calibration samples,

.. math::

    \Lambda = \frac{n_\text{data}}{n_\text{calib}} \, \mathrm{GGN}_\text{calib} + \delta I,

so it does not change with the number of calibration batches beyond sampling noise.
laplace-torch's diagonal simply sums per-sample curvature, so we fit on a loader over exactly the
calibration samples and rescale curvature and loss by ``n_data / n_calib`` before fitting the
prior precision :math:`\delta` by marginal likelihood.

The fit runs on an fp32 copy in eval mode; the caller's model is never touched.

Three structures (``fit_posterior(..., structure=...)``), all with the same scale:

* ``"diag"``: :math:`\Lambda = s\,\mathrm{diag}(\mathrm{GGN}) + \delta`, ``s = n_data / n_calib``.
* ``"kron"``: per layer :math:`\Lambda = s\,(G \otimes A) + \delta I` (K-FAC of laplace-torch's
  ``CurvlinopsGGN``), stored with the scale folded into ``A`` and ``mean(diag G) = 1``.
* ``"lowrank"``: per layer :math:`\Lambda = \mathrm{diag}(d) + U S U^\top + \delta I`, the top-k
  eigenpairs of the layer's GGN block plus the residual diagonal
  :math:`d = \mathrm{diag}(\mathrm{GGN}) - \mathrm{diag}(U S U^\top)`.
"""

from __future__ import annotations

import copy
import fnmatch
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

QUANTIZABLE = (nn.Linear, nn.Conv2d)


@dataclass
class LayerPosterior:
    r"""Gaussian over one layer's weight: mean and precision (prior included).

    ``precision`` is always the *diagonal* of the layer's posterior precision, in the weight's
    shape, so diagonal consumers work for every structure. The structured fields are set only
    for the structure that produced them (``structure`` says which):

    * ``"kron"``: ``A`` (in x in, ``in = prod(W.shape[1:])``) and ``G`` (out x out) with
      :math:`\Lambda = G \otimes A + \delta I` over ``W.reshape(out, -1).flatten()`` (row-major),
      normalised so that ``mean(diag G) = 1`` (``A`` carries the scale ``n_data / n_calib``);
      ``precision = outer(diag G, diag A) + delta``.
    * ``"lowrank"``: ``U`` (n_weights x k, orthonormal columns), ``S`` (k,) and ``residual``
      (weight-shaped, >= 0) with :math:`\Lambda = \mathrm{diag}(d) + U S U^\top + \delta I`
      over ``W.flatten()``; ``precision = residual + diag(U S U^T) + delta``.
    * ``"diag"``: only ``precision``.

    ``note`` records a fallback (e.g. a grouped convolution that got the diagonal metric inside a
    ``kron`` posterior, or a clamped rank).
    """

    name: str
    mean: torch.Tensor
    precision: torch.Tensor
    prior_precision: float
    structure: str = "diag"
    A: torch.Tensor | None = None
    G: torch.Tensor | None = None
    U: torch.Tensor | None = None
    S: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    note: str | None = None

    @property
    def sigma(self) -> torch.Tensor:
        """``precision ** -0.5``: the per-weight scale of the diagonal of the precision."""
        return self.precision.rsqrt()


@dataclass
class Posterior:
    """Per-layer posteriors plus how they were obtained (for the report)."""

    layers: dict[str, LayerPosterior]
    structure: str
    prior_precision: float
    n_data: int
    n_calib: int
    backend: str
    labels: str
    seconds: float
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- model helpers


def clone_module(model: nn.Module) -> nn.Module:
    """A deep copy that shares nothing with ``model`` (nor its Trainer); mode and dtypes kept."""
    memo: dict[int, object] = {}
    for attr in ("_trainer", "_fabric"):  # a LightningModule must not drag its Trainer along
        ref = model.__dict__.get(attr)
        if ref is not None:
            memo[id(ref)] = None
    return copy.deepcopy(model, memo)


def clone_fp32(model: nn.Module) -> nn.Module:
    """An fp32 deep copy in eval mode that shares nothing with ``model`` (nor its Trainer)."""
    return clone_module(model).float().eval()


def quantizable_layers(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``nn.Linear`` / ``nn.Conv2d`` selected by the name patterns."""
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, QUANTIZABLE):
            continue
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        chosen.append((name, module))
    if not chosen:
        kinds = sorted({type(m).__name__ for m in model.modules() if list(m.parameters(False))})
        raise ValueError(
            "the model has no quantizable layer (nn.Linear / nn.Conv2d) selected by "
            f"include={include!r}, exclude={exclude!r}; parameterised layer types found: {kinds}. "
            "Check the patterns or quantize a model built from Linear/Conv2d layers."
        )
    return chosen


def check_finite(layers: Sequence[tuple[str, nn.Module]]) -> None:
    """Refuse NaN/inf weights before any work: they would poison scales and curvature."""
    for name, module in layers:
        w = module.weight
        if not torch.isfinite(w).all():
            n_bad = int((~torch.isfinite(w)).sum())
            raise ValueError(
                f"layer {name!r} has {n_bad} NaN/inf weight(s); fix training (lower the learning "
                "rate, clip gradients) or exclude the layer with exclude=[...]"
            )


class LogitsModel(nn.Module):
    """Presents any classifier as ``f(x) -> logits (B, C)``; dict batches are passed as kwargs."""

    def __init__(self, model: nn.Module, label_key: str = "labels") -> None:
        super().__init__()
        self.model = model
        self.label_key = label_key

    def forward(self, x):
        if isinstance(x, Mapping):
            out = self.model(**{k: v for k, v in x.items() if k != self.label_key})
        else:
            out = self.model(x)
        return getattr(out, "logits", out)


# --------------------------------------------------------------------------- calibration data


class _Samples(Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def split_batch(batch) -> tuple[object, torch.Tensor | None]:
    """``(inputs, targets or None)`` of a tuple/list, bare tensor or HuggingFace dict batch."""
    if isinstance(batch, Mapping):
        return batch, batch.get("labels")
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def batch_size_of(inputs) -> int:
    if isinstance(inputs, Mapping):
        return len(next(iter(inputs.values())))
    return len(inputs)


def calibration_samples(loader, calib_batches: int) -> tuple[list, int]:
    """The first ``calib_batches`` batches of ``loader``, as a list of batches, and their size."""
    batches, n = [], 0
    for i, batch in enumerate(loader):
        if i >= calib_batches:
            break
        batches.append(batch)
        n += batch_size_of(split_batch(batch)[0])
    if n == 0:
        raise ValueError(
            "the calibration loader yielded no samples; pass a DataLoader with at least one "
            "non-empty batch (calib_batches counts batches from its start)"
        )
    return batches, n


@torch.no_grad()
def _labelled_dataset(net: nn.Module, batches: list, device: torch.device) -> tuple[Dataset, str]:
    """One dataset over exactly the calibration samples, with targets for laplace-torch.

    The GGN does not depend on labels; where a batch carries none, the model's own predictions
    stand in (the report says which).
    """
    items, used_predictions = [], False
    for batch in batches:
        x, y = split_batch(batch)
        x = inputs_to(x, device, torch.float32)  # the fit runs on an fp32 copy
        if y is None:
            y = net(x).argmax(-1)
            used_predictions = True
        y = y.to(device)
        if isinstance(x, Mapping):
            for i in range(len(y)):
                row = {k: v[i] for k, v in x.items() if k != "labels"}
                row["labels"] = y[i]
                items.append(row)
        else:
            items.extend(zip(x, y, strict=True))
    return _Samples(items), ("model predictions" if used_predictions else "given")


def inputs_to(x, device, dtype: torch.dtype | None = None):
    """Move a tensor or a mapping of tensors to ``device``; cast floating ones to ``dtype``."""
    def move(v):
        if not torch.is_tensor(v):
            return v
        v = v.to(device)
        return v.to(dtype) if dtype is not None and v.is_floating_point() else v

    if isinstance(x, Mapping):
        return {k: move(v) for k, v in x.items()}
    return move(x)


# --------------------------------------------------------------------------- the fit

_BACKENDS = {"asdl": ("AsdlGGN", False), "asdl_stochastic": ("AsdlGGN", True),
             "curvlinops": ("CurvlinopsGGN", False)}
STRUCTURES = ("diag", "kron", "lowrank")
DEFAULT_RANK = 8

Reduce = Callable[[torch.Tensor], torch.Tensor]


def fit_posterior(
    model: nn.Module,
    batches: list,
    layer_names: Sequence[str],
    *,
    n_data: int,
    prior_precision: str | float = "marglik",
    backend: str = "asdl",
    batch_size: int | None = None,
    reduce: Reduce | None = None,
    structure: str = "diag",
    rank: int | None = None,
) -> Posterior:
    r"""Fit a Laplace posterior over the weights of ``layer_names``.

    With :math:`s = n_\text{data} / n_\text{calib}` (``n_calib`` summed over processes when
    ``reduce`` is given), the posterior precision of a layer's weight is

    * ``structure="diag"``: :math:`\Lambda = s\,\mathrm{diag}(\mathrm{GGN}) + \delta`;
    * ``structure="kron"``: :math:`\Lambda = s\,\mathrm{KFAC}(\mathrm{GGN}) + \delta I
      = G \otimes A + \delta I` with ``mean(diag G) = 1``, see :func:`_fit_kron`;
    * ``structure="lowrank"``: :math:`\Lambda = \mathrm{diag}(d) + U S U^\top + \delta I`, with
      :math:`(U, S)` the top-``rank`` eigenpairs of :math:`s\,\mathrm{GGN}` restricted to the
      layer's weight and :math:`d = s\,\mathrm{diag}(\mathrm{GGN}) - \mathrm{diag}(U S U^\top)`
      (clamped at 0), see :func:`_fit_lowrank`.

    ``GGN`` is always the sum over the calibration samples of :math:`J^\top \Lambda_\ell J`
    (cross-entropy with ``reduction="sum"``).

    Parameters
    ----------
    model : nn.Module
        The trained model (not modified: the fit runs on :func:`clone_fp32`).
    batches : list
        Calibration batches (``(x, y)``, ``x`` alone, or dicts with a ``labels`` key).
    layer_names : sequence of str
        Dotted names of the ``nn.Linear`` / ``nn.Conv2d`` layers to return.
    n_data : int
        Training-set size the posterior stands for; curvature and loss are rescaled by
        ``n_data / n_calib``.
    prior_precision : "marglik" or float
        :math:`\delta`, fitted by marginal likelihood or fixed. ``kron``: marglik of the K-FAC
        posterior (laplace-torch ``KronLaplace``, scalar prior); ``lowrank``: marglik of the
        diagonal posterior that also provides the residual diagonal.
    backend : str
        ``"asdl"`` (exact GGN diagonal), ``"asdl_stochastic"`` (MC GGN) or ``"curvlinops"``.
        For ``kron`` the Kronecker factors always come from ``CurvlinopsGGN`` (stochastic, i.e.
        MC-Fisher K-FAC, for ``"asdl_stochastic"``); ``backend`` then only serves the diagonal
        fallback of grouped convolutions. For ``lowrank`` it computes the GGN diagonal.
    batch_size : int, optional
        Batch size of the loader laplace-torch iterates (default: that of ``batches[0]``).
    reduce : callable, optional
        ``reduce(tensor) -> tensor`` summing across processes. Every process must call
        ``fit_posterior`` with the same model, layers and arguments, so that the calls happen
        in the same order everywhere: curvature (diag: the GGN diagonal; kron: each Kronecker
        factor before decomposition), loss and sample count; for ``lowrank`` also every
        matrix-vector product of the per-layer GGN operator.
    structure : {"diag", "kron", "lowrank"}
        Posterior structure.
    rank : int, optional
        ``lowrank`` only: number of eigenpairs per layer. ``None`` means ``DEFAULT_RANK`` (8),
        clamped to ``n_weights - 1`` for smaller layers (with a note); an explicit ``rank`` that
        is not smaller than a layer's weight count is an error naming the layer.

    Returns
    -------
    Posterior
        Per layer: mean weight, diagonal of the precision (weight-shaped), ``delta`` and the
        structure's factors (see :class:`LayerPosterior`).
    """
    if structure not in STRUCTURES:
        raise ValueError(f"structure={structure!r} is not one of {STRUCTURES}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {tuple(_BACKENDS)}")
    if rank is not None and structure != "lowrank":
        raise ValueError(f"rank={rank!r} applies to structure='lowrank' only")
    args = dict(n_data=n_data, prior_precision=prior_precision, backend=backend,
                batch_size=batch_size, reduce=reduce)
    if structure == "kron":
        return _fit_kron(model, batches, layer_names, **args)
    if structure == "lowrank":
        return _fit_lowrank(model, batches, layer_names, rank=rank, **args)
    return _fit_diag(model, batches, layer_names, **args)


# --------------------------------------------------------------------------- shared pieces


class _Prepared:
    """The fp32 clone, the calibration dataset over exactly the calibration samples, its loader."""

    def __init__(self, model: nn.Module, batches: list, batch_size: int | None) -> None:
        self.net = LogitsModel(clone_fp32(model))
        self.device = next(self.net.parameters()).device
        self.data, self.labels = _labelled_dataset(self.net, batches, self.device)
        self.n_calib = len(self.data)
        bs = batch_size or batch_size_of(split_batch(batches[0])[0])
        self.loader = DataLoader(self.data, batch_size=bs)
        self.modules = dict(self.net.model.named_modules())

    @property
    def dict_key_x(self) -> str:
        """A key of the inputs whose first dimension is the batch (for dict batches)."""
        first = self.data[0]
        if isinstance(first, Mapping) and "input_ids" not in first:
            return next(k for k in first if k != "labels")
        return "input_ids"  # laplace-torch's default


@contextmanager
def _trainable_only(net: nn.Module, modules: Sequence[nn.Module]) -> Iterator[None]:
    """Make exactly the direct parameters of ``modules`` trainable; restore on exit, always.

    laplace-torch takes ``la.params`` = the parameters with ``requires_grad`` and its K-FAC
    refuses trainable parameters outside ``nn.Linear`` / ``nn.Conv2d``. The flags are put back
    in a ``finally`` so no object keeps them, also when the fit raises.
    """
    saved = [(p, p.requires_grad) for p in net.parameters()]
    try:
        for p in net.parameters():
            p.requires_grad_(False)
        for m in modules:
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _is_grouped(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1


def _check_layers(prep: _Prepared, layer_names: Sequence[str]) -> None:
    bad = [n for n in layer_names if not isinstance(prep.modules.get(n), QUANTIZABLE)]
    if bad:
        found = {n: type(prep.modules[n]).__name__ if n in prep.modules else "missing"
                 for n in bad}
        raise ValueError(
            f"layers {found} are not nn.Linear / nn.Conv2d modules of the model; only those "
            "get a posterior (check the names passed as layer_names)"
        )


# --------------------------------------------------------------------------- diag


class _DiagFit:
    """Result of the diagonal Laplace fit, shared by ``diag``, ``lowrank`` and kron's fallback."""

    def __init__(self, layers: dict[str, LayerPosterior], curvature: dict[str, torch.Tensor],
                 delta: float, n_total: int, backend: str) -> None:
        self.layers = layers          # LayerPosterior per requested layer (precision incl. delta)
        self.curvature = curvature    # rescaled GGN diagonal per requested layer (weight-shaped)
        self.delta = delta
        self.n_total = n_total
        self.backend = backend


def _diag_core(
    prep: _Prepared,
    layer_names: Sequence[str],
    *,
    n_data: int,
    prior_precision: str | float,
    backend: str,
    reduce: Reduce | None,
) -> _DiagFit:
    r"""Diagonal GGN Laplace on ``prep.net``: :math:`\Lambda = s\,\mathrm{diag}(\mathrm{GGN}) + \delta`.

    Curvature only where it is used: Linear/Conv2d parameters; everything else frozen (ASDL
    rejects trainable parameters of modules it does not support). laplace-torch's diagonal sums
    per-sample curvature and loss, so both are summed across processes as they are, then
    multiplied by :math:`s = n_\text{data} / n_\text{calib}`.
    """
    from laplace import Laplace
    from laplace import curvature as curv

    net, wanted = prep.net, set(layer_names)
    quantizable = [m for m in net.modules() if isinstance(m, QUANTIZABLE)]
    cls_name, stochastic = _BACKENDS[backend]
    with _trainable_only(net, quantizable):
        names = [n.removeprefix("model.") for n, p in net.named_parameters() if p.requires_grad]
        params = [p for p in net.parameters() if p.requires_grad]
        la = Laplace(
            net, "classification", subset_of_weights="all", hessian_structure="diag",
            backend=getattr(curv, cls_name), backend_kwargs={"stochastic": stochastic},
            prior_precision=1.0 if prior_precision == "marglik" else float(prior_precision),
            dict_key_x=prep.dict_key_x,
        )
        try:
            la.fit(prep.loader)
        except SystemExit as exc:  # laplace-torch calls exit() on numerical failure
            raise RuntimeError(f"laplace-torch aborted the posterior fit ({exc!r})") from None
        H = la.H.detach()
        loss = torch.as_tensor(la.loss, dtype=torch.float64)
        n_total = prep.n_calib
        if reduce is not None:
            H = reduce(H.clone())
            loss = reduce(loss.clone().to(H.device))
            n_total = int(reduce(torch.tensor(float(prep.n_calib), device=H.device)).item())
        factor = n_data / n_total
        la.H = H * factor
        la.loss = loss.to(H.dtype) * factor
        la.n_data = n_data
        if prior_precision == "marglik":
            la.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")
        delta = float(la.prior_precision.reshape(-1)[0])
        precision = la.posterior_precision.detach()
        curvature = la.H.detach()

    sizes = [p.numel() for p in params]
    layers, curv_out = {}, {}
    for pname, p, lam, h in zip(names, params, torch.split(precision, sizes),
                                torch.split(curvature, sizes), strict=True):
        lname, _, kind = pname.rpartition(".")
        if kind == "weight" and lname in wanted:
            layers[lname] = LayerPosterior(lname, p.detach().clone(), lam.view_as(p).clone(), delta)
            curv_out[lname] = h.view_as(p).clone()
    missing = wanted - set(layers)
    if missing:
        raise RuntimeError(f"no curvature was produced for layers {sorted(missing)}")
    return _DiagFit(layers, curv_out, delta, n_total, f"{cls_name}(stochastic={stochastic})")


def _fit_diag(model: nn.Module, batches: list, layer_names: Sequence[str], *, n_data: int,
              prior_precision: str | float, backend: str, batch_size: int | None,
              reduce: Reduce | None) -> Posterior:
    t0 = time.perf_counter()
    prep = _Prepared(model, batches, batch_size)
    fit = _diag_core(prep, layer_names, n_data=n_data, prior_precision=prior_precision,
                     backend=backend, reduce=reduce)
    return Posterior(
        layers={n: fit.layers[n] for n in layer_names}, structure="diag",
        prior_precision=fit.delta, n_data=n_data, n_calib=fit.n_total, backend=fit.backend,
        labels=prep.labels, seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- kron


def _fit_kron(model: nn.Module, batches: list, layer_names: Sequence[str], *, n_data: int,
              prior_precision: str | float, backend: str, batch_size: int | None,
              reduce: Reduce | None) -> Posterior:
    r"""K-FAC Laplace (laplace-torch ``KronLaplace`` with ``CurvlinopsGGN``).

    **How laplace-torch scales K-FAC.** ``BaseLaplace.fit`` sets ``N = len(loader.dataset)``
    and calls ``backend.kron(X, y, N=N)`` per batch of ``M`` samples. curvlinops'
    ``KFACLinearOperator`` over that one batch (loss ``CrossEntropyLoss(reduction="sum")``)
    returns the output factor as a *sum*, :math:`G_b = \sum_{n \in b} g_n g_n^\top` (correction
    1 for ``"sum"``), and the input factor as a *mean*,
    :math:`A_b = \frac{1}{M\,T} \sum_{n \in b} \sum_t x_{n,t} x_{n,t}^\top` (``T`` = number of
    conv output positions, 1 for Linear); laplace-torch then multiplies ``A_b`` by ``M / N``
    (``_rescale_kron_factors``), and ``Kron.__add__`` sums each factor over batches. After the
    fit, :math:`G = \sum_n g_n g_n^\top` and :math:`A = \frac{1}{N T} \sum_{n,t} x x^\top`, so
    :math:`G \otimes A` is the K-FAC approximation of the GGN *summed* over the ``N``
    calibration samples -- the same quantity the diagonal sums exactly. ``N`` must therefore be
    the number of samples actually iterated, which holds because the loader is over exactly the
    calibration samples.

    **Rescaling.** :math:`\Lambda = \frac{n_\text{data}}{n_\text{calib}} G \otimes A + \delta I`.
    Then the split is normalised: :math:`c = \mathrm{mean}(\mathrm{diag}\,G)`,
    :math:`G \leftarrow G / c`, :math:`A \leftarrow c\,s\,A` (a layer with :math:`G = 0`,
    e.g. dead ReLUs, keeps :math:`G = 0`). Bias blocks (one dense factor, already a sum) are
    multiplied by ``s``. ``la.H_facs`` gets the rescaled factors, ``la.loss`` the rescaled loss,
    and ``la.H = la.H_facs.decompose()`` is recomputed, so the marginal likelihood that fits
    :math:`\delta` (scalar prior) sees exactly the stored posterior.

    **Several processes.** Summing the factors as laplace-torch returns them is wrong: each
    shard's ``A_r`` is divided by its own ``N_r``. Each process multiplies ``A_r`` back by
    ``N_r`` (the unnormalised per-sample sum), sums ``G_r``, ``N_r A_r``, bias blocks, loss and
    ``N_r`` across processes, then divides the summed ``A`` by :math:`\sum_r N_r` -- exactly the
    factors of a single fit over all samples.

    **Layers.** K-FAC covers ``nn.Linear`` and ungrouped ``nn.Conv2d`` layers (every other
    parameter is frozen for the fit, on the fp32 clone). Grouped and depthwise convolutions get
    the *diagonal metric* (exact GGN diagonal from :func:`_diag_core`, rescaled, plus the
    K-FAC :math:`\delta`) with a note: curvlinops averages their input patches over the channel
    groups and shares one ``A`` across groups, which is not the per-group statistic the
    error-feedback rounding needs. :math:`\delta` is fitted on the K-FAC layers only.
    """
    from laplace import Laplace
    from laplace.curvature import CurvlinopsGGN
    from laplace.utils import Kron

    t0 = time.perf_counter()
    prep = _Prepared(model, batches, batch_size)
    _check_layers(prep, layer_names)
    net = prep.net
    kfac_modules = {n: m for n, m in prep.modules.items()
                    if isinstance(m, QUANTIZABLE) and not _is_grouped(m)}
    if not kfac_modules:
        kinds = sorted({type(m).__name__ for m in net.model.modules() if list(m.parameters(False))})
        raise ValueError(
            "structure='kron' needs at least one nn.Linear or ungrouped nn.Conv2d layer (the "
            f"only layers K-FAC supports); this model has parameterised layers {kinds}. "
            "Use structure='diag' (or 'lowrank') for it."
        )
    stochastic = _BACKENDS[backend][1]
    notes: list[str] = []
    with _trainable_only(net, list(kfac_modules.values())):
        names = [n.removeprefix("model.") for n, p in net.named_parameters() if p.requires_grad]
        params = [p for p in net.parameters() if p.requires_grad]
        la = Laplace(
            net, "classification", subset_of_weights="all", hessian_structure="kron",
            backend=CurvlinopsGGN, backend_kwargs={"stochastic": stochastic},
            prior_precision=1.0 if prior_precision == "marglik" else float(prior_precision),
            dict_key_x=prep.dict_key_x,
        )
        try:
            la.fit(prep.loader)
            kfacs, loss, n_total = _combine_kfacs(la, prep.n_calib, reduce)
            factor = n_data / n_total
            for F in kfacs:
                if len(F) == 2:
                    c = F[0].diagonal().mean()
                    if c > 0:
                        F[0] = F[0] / c
                        F[1] = F[1] * (c * factor)
                    else:
                        F[1] = F[1] * factor
                else:
                    F[0] = F[0] * factor
            la.H_facs = Kron(kfacs)
            la.H = la.H_facs.decompose(damping=la.damping)
        except SystemExit as exc:  # laplace.utils.symeig calls exit() when eigh fails twice
            raise RuntimeError(
                "laplace-torch aborted the K-FAC fit: the eigendecomposition of a Kronecker "
                f"factor failed ({exc!r}); the curvature is probably not finite. Check the "
                "model's outputs on the calibration data, or use structure='diag'."
            ) from None
        la.loss = loss.to(kfacs[0][0].dtype) * factor
        la.n_data = n_data
        if prior_precision == "marglik":
            la.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")
        delta = float(la.prior_precision.reshape(-1)[0])

    wanted = set(layer_names)
    layers: dict[str, LayerPosterior] = {}
    for pname, p, F in zip(names, params, la.H_facs.kfacs, strict=True):
        lname, _, kind = pname.rpartition(".")
        if kind != "weight" or lname not in wanted:
            continue
        out, n_in = p.shape[0], p[0].numel()
        if len(F) == 2:
            G, A = (f.detach().clone() for f in F)
        else:  # laplace-torch folds a 1x1 weight without bias into one scalar block
            G, A = torch.ones_like(F[0]).reshape(1, 1), F[0].detach().reshape(1, 1).clone()
        if G.shape != (out, out) or A.shape != (n_in, n_in):
            raise RuntimeError(
                f"K-FAC factors of {lname!r} have shapes G {tuple(G.shape)}, A {tuple(A.shape)}; "
                f"expected ({out}, {out}) and ({n_in}, {n_in}) (parameter order mismatch)"
            )
        lam = torch.outer(G.diagonal(), A.diagonal()).reshape(p.shape) + delta
        layers[lname] = LayerPosterior(lname, p.detach().clone(), lam, delta,
                                       structure="kron", A=A, G=G)

    grouped = [n for n in layer_names if n not in layers and _is_grouped(prep.modules[n])]
    backend_name = f"CurvlinopsGGN(stochastic={stochastic}) K-FAC"
    if grouped:
        fit = _diag_core(prep, grouped, n_data=n_data, prior_precision=1.0, backend=backend,
                         reduce=reduce)
        backend_name += f"; grouped convs: {fit.backend} diagonal"
        for n in grouped:
            note = (f"grouped Conv2d (groups={prep.modules[n].groups}): diagonal metric, "
                    "K-FAC shares one input factor across groups")
            notes.append(f"{n}: {note}")
            layers[n] = LayerPosterior(n, fit.layers[n].mean, fit.curvature[n] + delta, delta,
                                       structure="diag", note=note)
    missing = wanted - set(layers)
    if missing:
        raise RuntimeError(f"no curvature was produced for layers {sorted(missing)}")
    return Posterior(
        layers={n: layers[n] for n in layer_names}, structure="kron", prior_precision=delta,
        n_data=n_data, n_calib=n_total, backend=backend_name, labels=prep.labels,
        seconds=time.perf_counter() - t0,
        info={"notes": notes, "kfac_normalisation": "mean(diag G) = 1"},
    )


def _combine_kfacs(la, n_local: int, reduce: Reduce | None
                   ) -> tuple[list[list[torch.Tensor]], torch.Tensor, int]:
    r"""Kronecker factors, loss and sample count summed over processes, before decomposition.

    Returns factors with :math:`G = \sum_n g g^\top` and :math:`A = \frac{1}{N} \sum_n x x^\top`
    over *all* ``N`` samples (see :func:`_fit_kron`), the summed loss and ``N``.
    """
    kfacs = [[f.detach().clone() for f in F] for F in la.H_facs.kfacs]
    loss = torch.as_tensor(la.loss, dtype=torch.float64).detach().clone()
    if reduce is None:
        return kfacs, loss, n_local
    device = kfacs[0][0].device
    for F in kfacs:
        if len(F) == 2:
            F[1] = F[1] * n_local  # back to the unnormalised per-sample sum
        for i, f in enumerate(F):
            F[i] = reduce(f)
    loss = reduce(loss.to(device))
    n_total = int(reduce(torch.tensor(float(n_local), device=device)).item())
    for F in kfacs:
        if len(F) == 2:
            F[1] = F[1] / n_total
    return kfacs, loss, n_total


# --------------------------------------------------------------------------- lowrank


def _fit_lowrank(model: nn.Module, batches: list, layer_names: Sequence[str], *, n_data: int,
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
    prep = _Prepared(model, batches, batch_size)
    _check_layers(prep, layer_names)
    ks, notes = {}, []
    for n in layer_names:
        size = prep.modules[n].weight.numel()
        if rank is None:
            ks[n] = min(DEFAULT_RANK, size - 1)
            if ks[n] < DEFAULT_RANK:
                notes.append(f"{n}: rank clamped to {ks[n]} ({size} weights)")
        elif rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        elif rank >= size:
            raise ValueError(
                f"rank={rank} is not smaller than the {size} weights of layer {n!r} "
                "(eigsh needs k < n); pass a smaller rank, or rank=None to clamp per layer"
            )
        else:
            ks[n] = rank
    fit = _diag_core(prep, layer_names, n_data=n_data, prior_precision=prior_precision,
                     backend=backend, reduce=reduce)
    factor = n_data / fit.n_total
    layers = {}
    for n in layer_names:
        weight = prep.modules[n].weight
        U, S = _top_eigenpairs(prep, weight, ks[n], factor, reduce)
        h = fit.curvature[n].reshape(-1)
        low = (U.square() * S).sum(1)
        residual = (h - low).clamp_min(0)
        precision = (residual + low + fit.delta).view_as(weight)
        note = next((s.partition(": ")[2] for s in notes if s.startswith(f"{n}: ")), None)
        layers[n] = LayerPosterior(
            n, fit.layers[n].mean, precision, fit.delta, structure="lowrank", U=U, S=S,
            residual=residual.view_as(weight), note=note,
        )
    return Posterior(
        layers=layers, structure="lowrank", prior_precision=fit.delta, n_data=n_data,
        n_calib=fit.n_total, backend=f"{fit.backend} diagonal + curvlinops GGN eigsh",
        labels=prep.labels, seconds=time.perf_counter() - t0,
        info={"notes": notes, "rank": ks},
    )


def _top_eigenpairs(prep: _Prepared, weight: nn.Parameter, k: int, factor: float,
                    reduce: Reduce | None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Top-``k`` eigenpairs of ``factor * GGN`` restricted to ``weight`` (flattened row-major).

    Returns ``U`` (n x k, float32, descending eigenvalues) and ``S`` (k,), clamped at 0.
    """
    import numpy as np
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
    vals, vecs = eigsh(lin, k=k, which="LA", v0=v0)
    order = np.argsort(vals)[::-1]
    U = torch.as_tensor(vecs[:, order].copy(), dtype=weight.dtype, device=weight.device)
    S = torch.as_tensor(vals[order].copy(), dtype=weight.dtype, device=weight.device)
    return U, S.clamp_min(0)
