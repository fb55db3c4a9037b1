"""laplace-torch's private API: the K-FAC fit's own ``KronLaplace`` and its factor blocks.

Written against laplace-torch 0.3. :class:`KronLaplaceWithoutFactors` overrides ``_init_H`` and
sets the class key ``_key`` that laplace-torch's ``Laplace`` factory reads; :func:`kron_blocks`
and :func:`kron_fisher_type` call a curvature backend's ``_get_kron_factors`` and read its
``_kron_fisher_type``. Nothing else in the package touches laplace-torch's private names.
"""

from __future__ import annotations

import torch
from laplace.baselaplace import KronLaplace

PACKAGE, VERSION = "laplace-torch", "0.3"
OVERRIDDEN = (("KronLaplace", "_init_H", ("self",)),)
"""Private methods overridden here: class, method, parameters."""
CALLED = (("CurvlinopsInterface", "_get_kron_factors", ("self", "linop")),)
"""Private methods called here: class, method, parameters."""
ATTRIBUTES = (("KronLaplace", "_key"), ("CurvlinopsGGN", "_kron_fisher_type"))
"""Private class attributes (or properties) read or set here: class, name."""


class KronLaplaceWithoutFactors(KronLaplace):
    """laplace-torch's ``KronLaplace`` without its zero-filled ``H``.

    Its constructor allocates zero factors for every layer (the size of ``G`` and ``A`` again)
    that the K-FAC fit, which computes its factors itself, never reads. The subclass has a key of
    its own: laplace-torch's ``Laplace`` factory maps keys to subclasses and must never pick it.
    Only ``H_facs`` (set by that fit), the prior precision and the counts are valid on it: its
    own ``fit``, ``load_state_dict`` and ``posterior_precision`` need ``H``.
    """

    _key = ("bayesq_lightning", "kron without zero factors")

    def _init_H(self) -> None:
        self.H = None


def kron_fisher_type(backend) -> str:
    """The curvlinops ``fisher_type`` a laplace-torch curvlinops backend's K-FAC uses."""
    return backend._kron_fisher_type


def kron_blocks(backend, operator) -> list[list[torch.Tensor]]:
    """A computed curvlinops K-FAC operator's factors as laplace-torch's ``Kron`` blocks.

    In the order of the parameters: a weight gives ``[G, A]``, then its bias (if any) ``[G]``
    holding the same ``G`` tensor; a ``1 x 1`` weight without bias one block ``[G * A]``.
    """
    return [list(block) for block in backend._get_kron_factors(operator).kfacs]
