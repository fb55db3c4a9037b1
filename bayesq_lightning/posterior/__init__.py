"""Gaussian posteriors over the quantizable layers' weights, fitted with laplace-torch.

:func:`fit_posterior` builds one of three structures behind one interface
(:class:`LayerPosterior`: ``quad_form``, ``rounding_matrix``, ``sample``):
``"diag"`` (:mod:`.diag`), ``"kron"`` (:mod:`.kron`, its factors' algebra in
:mod:`.kron_factors`), ``"lowrank"`` (:mod:`.lowrank`), all through one laplace-torch scaffold
(:mod:`.fit`). Other packages' private API is used in :mod:`bayesq_lightning.adapters` only.
"""

from ..choices import BACKENDS, STRUCTURES
from .base import (
    KronLayerPosterior,
    LayerPosterior,
    LowRankLayerPosterior,
    Posterior,
)
from .factory import fit_posterior
from .fit import Reduce
from .lowrank import DEFAULT_RANK

__all__ = [
    "BACKENDS",
    "DEFAULT_RANK",
    "STRUCTURES",
    "KronLayerPosterior",
    "LayerPosterior",
    "LowRankLayerPosterior",
    "Posterior",
    "Reduce",
    "fit_posterior",
]
