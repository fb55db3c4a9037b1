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
"""

from __future__ import annotations

import copy
import fnmatch
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

QUANTIZABLE = (nn.Linear, nn.Conv2d)


@dataclass
class LayerPosterior:
    """Diagonal Gaussian over one layer's weight: mean and per-weight precision (prior included)."""

    name: str
    mean: torch.Tensor
    precision: torch.Tensor
    prior_precision: float

    @property
    def sigma(self) -> torch.Tensor:
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


def clone_fp32(model: nn.Module) -> nn.Module:
    """An fp32 deep copy in eval mode that shares nothing with ``model`` (nor its Trainer)."""
    memo: dict[int, object] = {}
    for attr in ("_trainer", "_fabric"):  # a LightningModule must not drag its Trainer along
        ref = model.__dict__.get(attr)
        if ref is not None:
            memo[id(ref)] = None
    clone = copy.deepcopy(model, memo)
    return clone.float().eval()


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
        x = _to(x, device)
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
            items.extend(zip(x.float() if x.is_floating_point() else x, y, strict=True))
    return _Samples(items), ("model predictions" if used_predictions else "given")


def _to(x, device):
    if isinstance(x, Mapping):
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in x.items()}
    return x.to(device)


# --------------------------------------------------------------------------- the fit

_BACKENDS = {"asdl": ("AsdlGGN", False), "asdl_stochastic": ("AsdlGGN", True),
             "curvlinops": ("CurvlinopsGGN", False)}


def fit_posterior(
    model: nn.Module,
    batches: list,
    layer_names: Sequence[str],
    *,
    n_data: int,
    prior_precision: str | float = "marglik",
    backend: str = "asdl",
    batch_size: int | None = None,
    reduce=None,
) -> Posterior:
    r"""Fit a diagonal Laplace posterior over the weights of ``layer_names``.

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
        :math:`\delta`, fitted by marginal likelihood or fixed.
    backend : str
        ``"asdl"`` (exact GGN diagonal), ``"asdl_stochastic"`` (MC GGN) or ``"curvlinops"``.
    reduce : callable, optional
        ``reduce(tensor) -> tensor`` summing across processes (curvature, loss, sample count).

    Returns
    -------
    Posterior
        Per layer: mean weight, per-weight precision ``scale * GGN_diag + delta``, ``delta``.
    """
    from laplace import Laplace
    from laplace import curvature as curv

    t0 = time.perf_counter()
    net = LogitsModel(clone_fp32(model))
    device = next(net.parameters()).device
    wanted = set(layer_names)
    # Curvature only where it is used: Linear/Conv2d parameters; everything else frozen (ASDL
    # rejects trainable parameters of modules it does not support).
    for p in net.parameters():
        p.requires_grad_(False)
    for m in net.modules():
        if isinstance(m, QUANTIZABLE):
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
    data, labels = _labelled_dataset(net, batches, device)
    n_calib = len(data)
    loader = DataLoader(data, batch_size=batch_size or batch_size_of(split_batch(batches[0])[0]))
    cls_name, stochastic = _BACKENDS[backend]
    la = Laplace(
        net, "classification", subset_of_weights="all", hessian_structure="diag",
        backend=getattr(curv, cls_name), backend_kwargs={"stochastic": stochastic},
        prior_precision=1.0 if prior_precision == "marglik" else float(prior_precision),
    )
    try:
        la.fit(loader)
    except SystemExit as exc:  # laplace-torch calls exit() on numerical failure
        raise RuntimeError(f"laplace-torch aborted the posterior fit ({exc!r})") from None
    H, loss, n_total = la.H.detach(), torch.as_tensor(la.loss, dtype=torch.float64), n_calib
    if reduce is not None:
        H = reduce(H.clone())
        loss = reduce(loss.clone().to(H.device))
        n_total = int(reduce(torch.tensor(float(n_calib), device=H.device)).item())
    factor = n_data / n_total
    la.H = H * factor
    la.loss = loss.to(H.dtype) * factor
    la.n_data = n_data
    if prior_precision == "marglik":
        la.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")
    delta = float(la.prior_precision.reshape(-1)[0])
    precision = la.posterior_precision.detach()

    names = [n.removeprefix("model.") for n, p in net.named_parameters() if p.requires_grad]
    params = [p for p in net.parameters() if p.requires_grad]
    chunks = torch.split(precision, [p.numel() for p in params])
    layers = {}
    for pname, p, lam in zip(names, params, chunks, strict=True):
        lname, _, kind = pname.rpartition(".")
        if kind == "weight" and lname in wanted:
            layers[lname] = LayerPosterior(lname, p.detach().clone(), lam.view_as(p).clone(), delta)
    missing = wanted - set(layers)
    if missing:
        raise RuntimeError(f"no curvature was produced for layers {sorted(missing)}")
    return Posterior(
        layers={n: layers[n] for n in layer_names}, structure="diag", prior_precision=delta,
        n_data=n_data, n_calib=n_total, backend=f"{cls_name}(stochastic={stochastic})",
        labels=labels, seconds=time.perf_counter() - t0,
    )
