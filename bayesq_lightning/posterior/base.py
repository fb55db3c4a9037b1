r"""One interface over the posterior structures: each layer's Gaussian owns its quadratic form.

Notation
--------
``mu``
    The layer's mean weight (the trained weight), flattened to ``(out, in)`` rows x columns with
    ``in = prod(W.shape[1:])``.
``Lambda``
    The posterior precision over ``W.flatten()`` (row-major), prior :math:`\delta I` included.
``dW``
    A block's weight error :math:`Q - \mu` over rows ``r0:r1`` of the layer (``(r1 - r0, in)``).

Every consumer goes through three methods, so none of them switches on the structure or reads
the factors:

* :meth:`LayerPosterior.quad_form` -- the block's score :math:`\mathrm{vec}(dW)^\top
  \Lambda_B\, \mathrm{vec}(dW)`, with :math:`\Lambda_B` the block's diagonal block of
  :math:`\Lambda`;
* :meth:`LayerPosterior.rounding_matrix` -- the input-side matrix ``H`` and damping ``gamma`` of
  error-feedback rounding, or ``None`` where the structure has none (plain rounding);
* :meth:`LayerPosterior.sample` -- weights drawn from the posterior (Monte-Carlo tables).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor


@dataclass
class LayerPosterior:
    r"""Gaussian over one layer's weight: the diagonal structure and the interface of all.

    ``precision`` is always the *diagonal* of the layer's posterior precision, in the weight's
    shape, so diagonal consumers (the grid design) work for every structure. ``note`` records a
    fallback (e.g. a grouped convolution that got the diagonal metric inside a ``kron``
    posterior, or a clamped rank).

    Diagonal structure: :math:`\Lambda = \mathrm{diag}(\lambda)`,
    ``quad_form`` :math:`= \sum_i \lambda_i dW_i^2`.
    """

    structure: ClassVar[str] = "diag"

    name: str
    mean: Tensor
    precision: Tensor
    prior_precision: float
    note: str | None = None

    def quad_form(self, dW: Tensor, rows: tuple[int, int]) -> float:
        """:math:`\\mathrm{vec}(dW)^\\top \\Lambda_B \\mathrm{vec}(dW)` of rows ``rows``, in float64."""
        r0, r1 = rows
        lam = self.precision.reshape(self.precision.shape[0], -1)[r0:r1].float().cpu().double()
        dW = dW.double()
        return float((lam * dW * dW).sum())

    def rounding_matrix(self, rows: tuple[int, int]) -> tuple[Tensor, float] | None:
        """``(H, gamma)`` for error-feedback rounding of rows ``rows``; ``None``: round to nearest."""
        return None

    def sample(self, n: int = 1, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        r"""``n`` draws ``mu + sqrt(T) * eps / sqrt(diag(Lambda))`` (fp32, CPU, ``(n, *shape)``).

        Every structure samples from the diagonal of its precision for now (the independent
        per-weight marginals' precisions, not the structured covariance).
        """
        eps = torch.randn((n, *self.mean.shape), generator=generator, dtype=torch.float32)
        scale = self.precision.float().cpu().rsqrt()
        if temperature != 1.0:
            scale = scale * temperature ** 0.5
        return self.mean.float().cpu() + eps * scale


@dataclass(kw_only=True)
class KronLayerPosterior(LayerPosterior):
    r"""K-FAC: :math:`\Lambda = G \otimes A + \delta I` over ``W.reshape(out, -1).flatten()``.

    ``A`` (in x in) and ``G`` (out x out) are normalised so that ``mean(diag G) = 1`` (``A``
    carries the scale ``n_data / n_calib``); ``precision = outer(diag G, diag A) + delta``.
    For rows ``r0:r1`` the score is :math:`\mathrm{tr}(G_B\, dW A\, dW^\top) + \delta \|dW\|^2`
    with :math:`G_B = G[r_0:r_1, r_0:r_1]`, and error feedback rounds under ``A`` damped by
    :math:`\delta` (the damping the prior implies for a typical row, since ``mean(diag G) = 1``).
    """

    structure: ClassVar[str] = "kron"

    A: Tensor
    G: Tensor

    def quad_form(self, dW: Tensor, rows: tuple[int, int]) -> float:
        r0, r1 = rows
        G = self.G.double().cpu()[r0:r1, r0:r1]
        A = self.A.double().cpu()
        dW = dW.double()
        return float(((G @ dW @ A) * dW).sum() + self.prior_precision * (dW * dW).sum())

    def rounding_matrix(self, rows: tuple[int, int]) -> tuple[Tensor, float]:
        return self.A.double().cpu().float(), self.prior_precision


@dataclass(kw_only=True)
class LowRankLayerPosterior(LayerPosterior):
    r"""Low rank plus diagonal: :math:`\Lambda = \mathrm{diag}(d) + U S U^\top + \delta I`.

    ``U`` (n_weights x k, orthonormal columns) and ``S`` (k,) are the top eigenpairs of the
    layer's GGN block, ``residual`` :math:`d` (weight-shaped, >= 0) the rest of its diagonal;
    ``precision = residual + diag(U S U^T) + delta``. For rows ``r0:r1`` the score is
    :math:`\sum (d_B + \delta) dW^2 + \|S^{1/2} U_B^\top \mathrm{vec}(dW)\|^2` with ``U_B`` the
    block's rows of ``U`` (the block's diagonal block of :math:`U S U^\top`).
    """

    structure: ClassVar[str] = "lowrank"

    U: Tensor
    S: Tensor
    residual: Tensor

    def quad_form(self, dW: Tensor, rows: tuple[int, int]) -> float:
        r0, r1 = rows
        cols = dW.shape[1]
        d = self.residual.reshape(self.residual.shape[0], -1)[r0:r1].cpu() + self.prior_precision
        U = self.U[r0 * cols: r1 * cols].cpu().double()
        dW = dW.double()
        proj = U.T @ dW.reshape(-1)
        return float((d.double() * dW * dW).sum() + (self.S.cpu().double() * proj * proj).sum())


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
