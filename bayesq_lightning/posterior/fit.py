r"""The laplace-torch scaffold every structure fits through, and what the fits share.

What the posterior stands for. It is the *training-set* posterior with its curvature estimated on
the calibration samples,

.. math::

    \Lambda = \frac{n_\text{data}}{n_\text{calib}} \, \mathrm{GGN}_\text{calib} + \delta I,

so it does not change with the number of calibration batches beyond sampling noise.
laplace-torch's diagonal simply sums per-sample curvature, so we fit on a loader over exactly the
calibration samples (:class:`Prepared`) and rescale curvature and loss by ``n_data / n_calib``
before fitting the prior precision :math:`\delta` by marginal likelihood
(:func:`laplace_fit`). The fit runs on an fp32 copy in eval mode; the caller's model is never
touched.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..batches import batch_size_of, forward_checked, fp32_logits_copy, inputs_to, split_batch
from ..layers import QUANTIZABLE, is_embedding, untie_parameters
from .marglik import Deferred, Spectrum, marglik_prior_precision

AUTO_EXACT_MAX_CLASSES = 10
"""``backend="auto"``: the exact GGN up to this many classes, the Monte-Carlo GGN above.

The exact GGN costs one backward pass per class and batch, the Monte-Carlo GGN one (ImageNet's
1000 classes: 1000x). The empirical Fisher, also one pass, is not offered: its gradients of the
observed labels vanish on a model that fits its training data."""
_BACKEND_CLASSES = MappingProxyType({"asdl": ("AsdlGGN", False),
                                     "asdl_stochastic": ("AsdlGGN", True),
                                     "curvlinops": ("CurvlinopsGGN", False)})

Reduce = Callable[[torch.Tensor], torch.Tensor]


def import_laplace() -> None:
    """Import laplace-torch once, without its dependencies' ``torch.jit.script`` deprecation
    warnings (not ours to act on; they would print on every first fit), and without the root
    logging handler its import-time ``logging.info`` installs (every record would print twice)."""
    before = list(logging.root.handlers)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated")
        import curvlinops  # noqa: F401
        import laplace.curvature  # noqa: F401
        import laplace.utils  # noqa: F401
    for handler in [h for h in logging.root.handlers if h not in before]:
        logging.root.removeHandler(handler)


def backend_class(backend: str) -> tuple[str, bool]:
    """laplace-torch curvature class name and ``stochastic`` flag of a ``backend`` option."""
    return _BACKEND_CLASSES[backend]


class _Samples(Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


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


@torch.no_grad()
def _check_fits(net: nn.Module, batch, device: torch.device, index: int = 0) -> int:
    """One forward pass on a batch, before any long work: a clear error if it fails; returns
    the number of classes."""
    x, _ = split_batch(batch)
    out = forward_checked(net, inputs_to(x, device, torch.float32), index)
    if not torch.is_tensor(out) or out.dim() != 2:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(f"the model's output on the calibration batches is {shape}, not "
                         "(batch, classes) logits; the posterior fit needs a classifier")
    return out.shape[1]


def _input_form(x) -> tuple:
    """The form of a batch's inputs: structure, dtypes, devices, the shapes past the batch
    dimension and whether that dimension is 1 (a ``squeeze`` may drop it). A misfit that depends
    on the values alone (e.g. token ids past the vocabulary) is not caught by the form."""
    if torch.is_tensor(x):
        return ("tensor", x.dtype, str(x.device), tuple(x.shape[1:]), x.dim() > 0 and len(x) == 1)
    if isinstance(x, Mapping):
        return ("mapping", *sorted(((str(k), _input_form(v)) for k, v in x.items()),
                                   key=lambda item: item[0]))
    if isinstance(x, (tuple, list)):
        return (type(x).__name__, *map(_input_form, x))
    return (type(x).__name__, id(x))  # anything else: checked on its own


class Prepared:
    """The fp32 clone, the calibration dataset over exactly the calibration samples, its loader."""

    def __init__(self, model: nn.Module, batches: list, batch_size: int | None) -> None:
        # the fits read the weights, never write them: the copy shares the model's fp32
        # weights (fit_posterior gives the posterior means their own copy afterwards)
        self.net, self.device, self.modules = fp32_logits_copy(model, share_weights=True)
        untie_parameters(self.net)  # a shared weight would reach laplace-torch twice
        # a forward pass on each batch whose input form differs from all checked ones (usually
        # only the first): a batch of another form that misfits is named before the fit
        checked: set[tuple] = set()
        for i, batch in enumerate(batches):
            form = _input_form(split_batch(batch)[0])
            if form not in checked:
                self.n_classes = _check_fits(self.net, batch, self.device, i)
                checked.add(form)
        self.data, self.labels = _labelled_dataset(self.net, batches, self.device)
        self.n_calib = len(self.data)
        bs = batch_size or batch_size_of(split_batch(batches[0])[0])
        self.loader = DataLoader(self.data, batch_size=bs)

    def backend(self, backend: str) -> tuple[str, str]:
        """``backend`` with ``"auto"`` resolved by the class count, and how it was chosen."""
        if backend != "auto":
            return backend, ""
        if self.n_classes <= AUTO_EXACT_MAX_CLASSES:
            return "asdl", f" (auto: {self.n_classes} classes, exact GGN)"
        return "asdl_stochastic", (f" (auto: {self.n_classes} classes > "
                                   f"{AUTO_EXACT_MAX_CLASSES}, Monte-Carlo GGN)")

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


def is_grouped(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1


def check_layers(prep: Prepared, layer_names: Sequence[str]) -> None:
    bad = [n for n in layer_names if not isinstance(prep.modules.get(n), QUANTIZABLE)
           and not is_embedding(prep.modules.get(n))]
    if bad:
        found = {n: type(prep.modules[n]).__name__ if n in prep.modules else "missing"
                 for n in bad}
        raise ValueError(
            f"layers {found} are not nn.Linear / nn.Conv2d modules of the model; only those "
            "get a posterior (check the names passed as layer_names)"
        )


@dataclass
class LaplaceFit:
    """A fitted laplace-torch object at the ``n_data`` scale, its parameters and ``delta``."""

    la: object
    names: list[str]   # parameter names relative to the user's model
    params: list[nn.Parameter]
    delta: float | Deferred  # Deferred: solved when first read (K-FAC)
    n_total: int       # calibration samples summed over processes


def laplace_fit(
    prep: Prepared,
    modules: Sequence[nn.Module],
    *,
    hessian_structure: str,
    backend_cls: type,
    stochastic: bool,
    prior_precision: str | float,
    n_data: int,
    rescale: Callable[[object], int],
    spectrum: Callable[[object], Spectrum],
    abort: str,
    fit: Callable[[object], None] | None = None,
    defer: Callable[[], Callable[[], Spectrum]] | None = None,
) -> LaplaceFit:
    """Fit laplace-torch on exactly the parameters of ``modules``, rescaled to ``n_data``.

    The one scaffold behind every structure: freeze everything else (and restore it, always),
    build ``Laplace``, fit on :attr:`Prepared.loader`, let ``rescale(la)`` combine processes and
    rescale the curvature to the ``n_data`` scale (it returns the global calibration count),
    then fit :math:`\delta` by marginal likelihood on the eigenvalues ``spectrum(la)``
    of the rescaled curvature (:func:`~.marglik.marglik_prior_precision`), or keep the given
    value. ``fit(la)``, if given, replaces ``la.fit(loader)`` (K-FAC computes its factors in one
    pass of its own). ``defer``, if given, is called after the rescale and returns the spectrum
    as a closure that holds neither ``la`` nor the network: :math:`\delta` is then a
    :class:`~.marglik.Deferred`, solved on its first read (``la.prior_precision`` stays 1).
    laplace-torch calls ``exit()`` on some numerical failures; that becomes a ``RuntimeError``
    whose message is ``abort`` formatted with ``exc``.
    """
    import_laplace()
    from laplace import Laplace

    from ..adapters.asdl import exact_grouped_convs

    with _trainable_only(prep.net, modules):
        names = [n.removeprefix("model.") for n, p in prep.net.named_parameters()
                 if p.requires_grad]
        params = [p for p in prep.net.parameters() if p.requires_grad]
        kwargs = {"backend": backend_cls, "backend_kwargs": {"stochastic": stochastic},
                  "prior_precision": 1.0 if prior_precision == "marglik" else float(prior_precision),
                  "dict_key_x": prep.dict_key_x}
        if fit is None:
            la = Laplace(prep.net, "classification", subset_of_weights="all",
                         hessian_structure=hessian_structure, **kwargs)
        elif hessian_structure == "kron":  # fit() fills H_facs itself: no zero factors
            from ..adapters.laplace import KronLaplaceWithoutFactors

            la = KronLaplaceWithoutFactors(prep.net, "classification", **kwargs)
        else:
            raise ValueError("a fit of its own is only supported for K-FAC, not "
                             f"{hessian_structure!r}")
        try:
            # ASDL's module hooks: its own deprecation, not ours; its grouped convolutions exact
            with warnings.catch_warnings(), exact_grouped_convs():
                warnings.filterwarnings("ignore", message="Using a non-full backward hook")
                if fit is None:
                    la.fit(prep.loader)
                else:
                    fit(la)
            n_total = rescale(la)
        except SystemExit as exc:  # laplace-torch calls exit() on numerical failure
            raise RuntimeError(abort.format(exc=repr(exc))) from None
        la.n_data = n_data
        delta: float | Deferred
        if prior_precision == "marglik":
            theta_sq = sum(float(p.detach().double().square().sum()) for p in params)
            if defer is not None:
                eigenvalues, n_params = defer(), la.n_params
                delta = Deferred(lambda: marglik_prior_precision(eigenvalues(), theta_sq,
                                                                 n_params))
            else:
                la.prior_precision = marglik_prior_precision(spectrum(la), theta_sq, la.n_params)
                delta = float(la.prior_precision.reshape(-1)[0])
        else:
            delta = float(la.prior_precision.reshape(-1)[0])
    return LaplaceFit(la, names, params, delta, n_total)


def global_count(n_local: int, reduce: Reduce | None, device: torch.device) -> int:
    """The calibration sample count summed over processes."""
    if reduce is None:
        return n_local
    return int(reduce(torch.tensor(float(n_local), device=device)).item())
