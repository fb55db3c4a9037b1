"""``fit_posterior``: the factory over the posterior structures (laplace-torch's ``Laplace`` style)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

from torch import nn

from ..batches import largest_input
from ..choices import BACKENDS, STRUCTURES
from ..layers import QUANTIZABLE
from .base import Posterior
from .diag import fit_diag
from .fit import Reduce
from .kron import fit_kron
from .lowrank import fit_lowrank

FITS: Mapping[str, Callable[..., Posterior]] = MappingProxyType(
    {"diag": fit_diag, "kron": fit_kron, "lowrank": fit_lowrank})


def fit_posterior(
    model: nn.Module,
    batches: list,
    layer_names: Sequence[str],
    *,
    n_data: int,
    prior_precision: str | float = "marglik",
    backend: str = "auto",
    batch_size: int | None = None,
    reduce: Reduce | None = None,
    structure: str = "diag",
    rank: int | None = None,
    kfac_batches: int | None = None,
) -> Posterior:
    r"""Fit a Laplace posterior over the weights of ``layer_names``.

    With :math:`s = n_\text{data} / n_\text{calib}` (``n_calib`` summed over processes when
    ``reduce`` is given), the posterior precision of a layer's weight is

    * ``structure="diag"``: :math:`\Lambda = s\,\mathrm{diag}(\mathrm{GGN}) + \delta`;
    * ``structure="kron"``: :math:`\Lambda = s\,\mathrm{KFAC}(\mathrm{GGN}) + \delta I
      = G \otimes A + \delta I` with ``mean(diag G) = 1``, see :func:`~bayesq_lightning.posterior.kron.fit_kron`;
    * ``structure="lowrank"``: :math:`\Lambda = \mathrm{diag}(d) + U S U^\top + \delta I`, with
      :math:`(U, S)` the top-``rank`` eigenpairs of :math:`s\,\mathrm{GGN}` restricted to the
      layer's weight and :math:`d = s\,\mathrm{diag}(\mathrm{GGN}) - \mathrm{diag}(U S U^\top)`
      (clamped at 0), see :func:`~bayesq_lightning.posterior.lowrank.fit_lowrank`.

    ``GGN`` is always the sum over the calibration samples of :math:`J^\top \Lambda_\ell J`
    (cross-entropy with ``reduction="sum"``).

    Parameters
    ----------
    model : nn.Module
        The trained model (not modified: the fit runs on an fp32 copy).
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
        ``"auto"`` (default: ``"asdl"`` up to ``AUTO_EXACT_MAX_CLASSES`` = 10 classes,
        ``"asdl_stochastic"`` above; the choice is stated in ``Posterior.backend``),
        ``"asdl"`` (exact GGN diagonal), ``"asdl_stochastic"`` (MC GGN) or ``"curvlinops"``.
        For ``kron`` the Kronecker factors always come from ``CurvlinopsGGN`` (stochastic, i.e.
        MC-Fisher K-FAC, for ``"asdl_stochastic"``); ``backend`` then only serves the diagonal
        fallback of grouped convolutions. For ``lowrank`` it computes the GGN diagonal.
    batch_size : int, optional
        Batch size of the loader laplace-torch iterates (default: that of ``batches[0]``).
    reduce : callable, optional
        ``reduce(tensor) -> tensor`` summing across processes; it may sum in place (as an
        all-reduce does). Every process must call ``fit_posterior`` with the same model, layers
        and arguments, so that the calls happen in the same order everywhere. diag: the GGN
        diagonal, loss and sample count; kron: each distinct Kronecker factor tensor, the
        sample count, whether any process streams input factors and, if so, each layer's input
        sums and row count; ``lowrank``: the diagonal fit's, then every matrix-vector product of
        the per-layer GGN operator.
    structure : {"diag", "kron", "lowrank"}
        Posterior structure.
    rank : int, optional
        ``lowrank`` only: number of eigenpairs per layer. ``None`` means ``DEFAULT_RANK`` (8),
        clamped to ``n_weights - 1`` for smaller layers (with a note); an explicit ``rank`` that
        is not smaller than a layer's weight count is an error naming the layer.

    kfac_batches : int, optional
        ``kron`` only: the K-FAC fit (backward passes) runs on the first ``kfac_batches``
        batches and the input factors ``A`` (forward passes) on all of them; ``None``: all
        batches for both.

    A layer whose weight another Linear/Conv2d layer also holds (``b.weight = a.weight``) gets
    one posterior over that weight with the curvature of both uses
    (:meth:`~bayesq_lightning.posterior.LayerPosterior.tied_with`).

    Returns
    -------
    Posterior
        Per layer: mean weight, diagonal of the precision (weight-shaped), ``delta`` and the
        structure's factors (a :class:`~bayesq_lightning.posterior.LayerPosterior` of the structure).
    """
    if structure not in FITS:
        raise ValueError(f"structure={structure!r} is not one of {STRUCTURES}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if rank is not None and structure != "lowrank":
        raise ValueError(f"rank={rank!r} applies to structure='lowrank' only")
    if kfac_batches is not None and (isinstance(kfac_batches, bool)
                                     or not isinstance(kfac_batches, int) or kfac_batches < 1):
        raise ValueError(f"kfac_batches={kfac_batches!r} must be a positive integer or None")
    extra = ({"rank": rank} if structure == "lowrank"
             else {"kfac_batches": kfac_batches} if structure == "kron" else {})
    aliases = tied_aliases(model, layer_names)
    posterior = FITS[structure](model, batches, [*layer_names, *aliases], n_data=n_data,
                                prior_precision=prior_precision, backend=backend,
                                batch_size=batch_size, reduce=reduce, **extra)
    for alias, owner in aliases.items():  # one weight, one posterior: both uses' curvature
        posterior.layers[owner] = posterior.layers[owner].tied_with(posterior.layers.pop(alias))
    # the fit read the model's own weights (Prepared): the means get their own copies, one
    # layer at a time, so that later edits of the model do not move the posterior
    shared = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for lp in posterior.layers.values():
        if lp.mean.untyped_storage().data_ptr() in shared:
            lp.mean = lp.mean.detach().clone()
    bad = [n for n, lp in posterior.layers.items() if not lp.is_finite()]
    if bad:
        raise ValueError(
            f"the fitted curvature of layers {bad} is not finite (NaN/inf): the calibration "
            f"inputs (largest |x| = {largest_input(batches):.3g}) or the model's outputs on them "
            "overflow in fp32; normalise the calibration inputs as in training and check the "
            "model's outputs on them"
        )
    return posterior


def tied_aliases(model: nn.Module, layer_names: Sequence[str]) -> dict[str, str]:
    """``{alias: owner}``: other Linear/Conv2d layers holding the weight of a named layer."""
    owners = {id(model.get_submodule(n).weight): n for n in layer_names}
    return {name: owners[id(m.weight)] for name, m in model.named_modules()
            if isinstance(m, QUANTIZABLE) and name not in layer_names
            and id(m.weight) in owners}
