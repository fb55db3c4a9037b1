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

Every consumer goes through these methods, so none of them switches on the structure or reads
the factors:

* :meth:`LayerPosterior.quad_form` / :meth:`~LayerPosterior.block_loss` -- the block's loss :math:`\mathrm{vec}(dW)^\top
  (sH)_B\, \mathrm{vec}(dW)`, with :math:`(sH)_B` the block's diagonal block of the likelihood
  curvature (optionally plus the prior, i.e. :math:`\Lambda_B`);
* :meth:`LayerPosterior.design_weights` -- the per-weight weights of the grid design;
* :meth:`LayerPosterior.rounding_matrix` -- the input-side matrix ``H`` of error-feedback
  rounding, or ``None`` where the structure has none (plain rounding);
* :meth:`LayerPosterior.row_terms` -- the loss's row terms, for a width chosen on a row sample;
* :meth:`LayerPosterior.sample` -- weights drawn from the posterior (Monte-Carlo tables, the
  sampling teacher);
* :meth:`LayerPosterior.output_variance` -- the GLM variance of a Linear layer's outputs (the
  last-layer predictive teacher).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..row_sample import RowTerms
from .marglik import DeferredAttribute, known, stored


def _formed_from_factors(name: str, value: Tensor | None) -> None:
    if value is not None:
        raise TypeError(f"a K-FAC posterior's {name} is formed from its factors G and A; "
                             "set those instead")


def _rows(t: Tensor, rows: tuple[int, int]) -> Tensor:
    """Rows ``r0:r1`` of a weight-shaped tensor viewed as ``(out, cols)``, float64 on the CPU."""
    return t.reshape(t.shape[0], -1)[rows[0]:rows[1]].cpu().double()


@dataclass
class LayerPosterior:
    r"""Gaussian over one layer's weight: the diagonal structure and the interface of all.

    The precision is :math:`\Lambda = s H + \delta I`: the likelihood curvature (GGN of the
    training loss, ``s = n_data / n_calib`` times the calibration sum) plus the prior.

    ``precision`` is always the *diagonal* of :math:`\Lambda` and ``curvature`` the diagonal of
    :math:`s H`, both in the weight's shape, so diagonal consumers (the grid design) work for
    every structure. ``note`` records a fallback (e.g. a grouped convolution that got the
    diagonal metric inside a ``kron`` posterior, or a clamped rank).

    Diagonal structure: :math:`s H = \mathrm{diag}(c)`, ``quad_form``
    :math:`= \sum_i c_i\, dW_i^2`.
    """

    structure: ClassVar[str] = "diag"

    name: str
    mean: Tensor
    precision: Tensor
    prior_precision: float
    note: str | None = None
    curvature: Tensor | None = None

    def __post_init__(self) -> None:
        if self.curvature is None:  # e.g. a record built by hand: the precision minus the prior
            self.curvature = (self.precision - self.prior_precision).clamp_min(0)

    def quad_form(self, dW: Tensor, rows: tuple[int, int], prior: bool = False) -> float:
        r"""Twice the second-order loss increase :math:`\mathrm{vec}(dW)^\top (sH)_B \mathrm{vec}(dW)`.

        ``dW`` is the error of rows ``rows`` (``(r1 - r0, cols)``), the result in float64.
        Treating the trained weights as a stationary point of the training loss, this is the
        expected increase of the task loss from deploying ``mu + dW`` (times two). With
        ``prior=True`` the prior's :math:`\delta \|dW\|^2` is added: the quadratic form of the
        posterior precision :math:`\Lambda_B` (the ``score="posterior_precision"`` ablation).
        """
        return self.block_loss(rows, prior)(dW)

    def block_loss(self, rows: tuple[int, int], prior: bool = False) -> Callable[[Tensor], float]:
        """:meth:`quad_form` of rows ``rows`` as a function of ``dW`` (float64).

        The pipeline scores every candidate of a block (each width and grid) with one of these,
        held while the block's candidates are scored and dropped with them.
        """
        curvature = self._curvature_loss(rows)
        delta = self.prior_precision if prior else 0.0  # read (computed) only when it counts

        def form(dW: Tensor) -> float:
            dW = dW.double()
            total = curvature(dW)
            if prior:
                total += delta * float((dW * dW).sum())
            return total

        return form

    def _curvature_loss(self, rows: tuple[int, int]) -> Callable[[Tensor], float]:
        return lambda dW: float((_rows(self.curvature, rows) * dW * dW).sum())

    def row_terms(self, rows: tuple[int, int], prior: bool = False) -> RowTerms:
        """The row terms of :meth:`block_loss`, for choosing a width on a row sample.

        Each row's curvature scale ``g`` (``(r1 - r0,)``, float64) and a function of
        ``(dW[idx], idx)`` (``idx`` block-relative rows) giving those rows' own terms of the
        loss, without the cross-row ones (:mod:`~bayesq_lightning.row_sample`). Only
        structures with a rounding matrix have one: the pipeline samples blocks rounded by
        error feedback.
        """
        raise NotImplementedError(f"the {self.structure} structure rounds to nearest and scores "
                                  "every row; row terms are K-FAC's")

    def is_finite(self) -> bool:
        """Whether the curvature and precision are finite (no NaN/inf)."""
        return bool(torch.isfinite(self.curvature).all() and torch.isfinite(self.precision).all())

    def design_weights(self, rows: tuple[int, int], prior: bool = False) -> Tensor:
        r"""Per-weight weights ``(r1 - r0, cols)`` (fp32) of the grid design: ``diag(sH)``.

        A row with no curvature at all falls back to a constant weight, i.e. plain MSE for its
        own grid (a zero-weighted objective has no minimiser): 1e-6 of the block's mean live
        curvature, so that it barely moves a codebook shared with live rows (whose errors are
        what the score counts), or 1 where the whole block is dead. ``prior=True``: the
        diagonal of :math:`\Lambda` instead.
        """
        if prior:
            return _rows(self.precision, rows).float()
        w = _rows(self.curvature, rows).float()
        dead = ~(w > 0).any(dim=1)
        if dead.any():
            live = w[~dead]
            w[dead] = 1e-6 * float(live[live > 0].mean()) if len(live) else 1.0
        return w

    def precision_rows(self, rows: tuple[int, int]) -> Tensor:
        """Rows ``r0:r1`` of the precision diagonal as ``(r1 - r0, cols)`` fp32 on the CPU."""
        return self.precision.reshape(self.precision.shape[0], -1)[rows[0]:rows[1]].float().cpu()

    def with_precision(self) -> LayerPosterior:
        """This record with ``precision = curvature + delta`` (after the factors changed)."""
        self.precision = self.curvature + self.prior_precision
        return self

    def tied_with(self, other: LayerPosterior) -> LayerPosterior:
        r"""The posterior of one weight that this layer and ``other`` both use (tied weights).

        The GGN of a shared weight is the sum over its uses plus cross terms between them,
        which per-layer factors do not hold; they are dropped (exact when the uses' Jacobians
        are orthogonal). Diagonal: :math:`c = c_1 + c_2`; the structures override this to keep
        their factors, and any mix of structures falls back to it.
        """
        c = self.curvature + other.curvature
        return LayerPosterior(self.name, self.mean, c + self.prior_precision, self.prior_precision,
                              note=_tie_note(self, other), curvature=c)

    def rounding_matrix(self, rows: tuple[int, int]) -> Tensor | None:
        """The input-side matrix ``H`` of error-feedback rounding of rows ``rows`` (damped by
        the rounding, relative to its scale); ``None``: round to nearest."""
        return None

    def sample(self, n: int = 1, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        r"""``n`` draws from :math:`N(\mu, T \Lambda^{-1})` (fp32, CPU, ``(n, *shape)``).

        The diagonal structure: ``mu + sqrt(T) * eps / sqrt(precision)``.
        """
        eps = torch.randn((n, *self.mean.shape), generator=generator, dtype=torch.float32)
        scale = self.precision.float().cpu().rsqrt()
        if temperature != 1.0:
            scale = scale * temperature ** 0.5
        return self.mean.float().cpu() + eps * scale

    def output_variance(self, features: Tensor, temperature: float = 1.0) -> Tensor:
        r"""Diagonal of :math:`J \Sigma J^\top` for a Linear layer's outputs, ``(B, out)`` fp32.

        For :math:`f = W \phi + b` the Jacobian of output ``c`` with respect to ``vec(W)`` is
        :math:`e_c \otimes \phi`, so with :math:`\Sigma = T \Lambda^{-1}` (the weight's
        posterior covariance; the bias is not part of it)
        :math:`\mathrm{Var} f_c = T\, (e_c \otimes \phi)^\top \Lambda^{-1} (e_c \otimes \phi)`.
        Diagonal structure: :math:`T \sum_j \phi_j^2 / \Lambda_{cj}`.

        Parameters
        ----------
        features : Tensor
            The layer's inputs :math:`\phi`, ``(B, in)``.
        temperature : float
            :math:`T`, scales the covariance.
        """
        phi = self._check_features(features)
        return temperature * (phi * phi) @ (1.0 / self.precision.double().cpu()).T

    def _check_features(self, features: Tensor) -> Tensor:
        if self.mean.dim() != 2 or features.dim() != 2 or features.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"the output variance of {self.name!r} needs a Linear layer's inputs (B, "
                f"{self.mean.shape[1] if self.mean.dim() == 2 else '?'}); got features of "
                f"shape {tuple(features.shape)} for a weight of shape {tuple(self.mean.shape)}"
            )
        return features.detach().double().cpu()


@dataclass(kw_only=True)
class KronLayerPosterior(LayerPosterior):
    r"""K-FAC: :math:`\Lambda = G \otimes A + \delta I` over ``W.reshape(out, -1).flatten()``.

    ``A`` (in x in) and ``G`` (out x out) are normalised so that ``mean(diag G) = 1`` (``A``
    carries the scale ``n_data / n_calib``); ``curvature = outer(diag G, diag A)`` and
    ``precision = curvature + delta``, both formed from the factors when read (not stored). For rows ``r0:r1`` the score is
    :math:`\mathrm{tr}(G_B\, dW A\, dW^\top)` with :math:`G_B = G[r_0:r_1, r_0:r_1]`, and error
    feedback rounds under ``A`` damped relative to its own scale,
    ``gamma = damp * mean(diag A)`` (GPTQ's rule; ``G`` enters the score, not the rounding).

    A grouped or depthwise convolution (``groups`` channel groups of ``per = out / groups``
    output channels) has one input factor per group, ``A`` of shape ``(groups, cols, cols)``:
    the rows of group ``g`` see only that group's input channels. Its precision is
    block-diagonal over the groups, :math:`\Lambda = \bigoplus_g G_{gg} \otimes A_g + \delta
    I` with :math:`G_{gg}` the group's diagonal block of ``G`` (the cross-group terms of the
    GGN are dropped, as K-FAC drops those between layers); scores, rounding and draws are
    taken group by group.
    """

    structure: ClassVar[str] = "kron"
    # a number, or the marginal-likelihood solve deferred until something reads it
    prior_precision = DeferredAttribute()

    A: Tensor
    G: Tensor
    _eig: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pass  # nothing to fill: the base's check would form the curvature just to discard it

    @property
    def groups(self) -> int:
        """Channel groups: one input factor each (1 for a Linear or ungrouped Conv2d)."""
        return 1 if self.A.dim() == 2 else self.A.shape[0]

    def _diag_outer(self, r0: int, r1: int) -> Tensor:
        """Rows ``r0:r1`` of ``outer(diag G, diag A)`` (each row its group's ``A``)."""
        g = self.G.diagonal()[r0:r1]
        if self.groups == 1:
            return torch.outer(g, self.A.diagonal())
        a = self.A.diagonal(dim1=-2, dim2=-1).repeat_interleave(self.G.shape[0] // self.groups, 0)
        return g.unsqueeze(1) * a[r0:r1]

    # Both diagonals are formed from the factors on each access instead of being stored: they
    # would be two dense fp32 tensors the size of the weights per layer. The dataclass's
    # constructor assigns both fields, so the setters take ``None`` and refuse anything else.
    @property
    def curvature(self) -> Tensor:
        """``outer(diag G, diag A)`` in the weight's shape (fp32, formed per access)."""
        return self._diag_outer(0, self.G.shape[0]).reshape(self.mean.shape)

    @curvature.setter
    def curvature(self, value: Tensor | None) -> None:
        _formed_from_factors("curvature", value)

    @property
    def precision(self) -> Tensor:
        """``curvature + delta``: the diagonal of :math:`\Lambda` (formed per access)."""
        return self.curvature + self.prior_precision

    @precision.setter
    def precision(self, value: Tensor | None) -> None:
        _formed_from_factors("precision", value)

    def is_finite(self) -> bool:
        # from the factors' diagonals, without forming the two weight-sized diagonals: both
        # are non-negative, so every product g_i a_j is finite iff the largest one is
        g, a = self.G.diagonal(), self.A.diagonal(dim1=-2, dim2=-1)
        top = g.abs().amax() * a.abs().amax() + (known(stored(self)) or 0.0)  # finite if solved
        return bool(torch.isfinite(g).all() and torch.isfinite(a).all() and torch.isfinite(top))

    def precision_rows(self, rows: tuple[int, int]) -> Tensor:
        # only these rows, not a view of a whole-layer tensor kept alive by every block
        return (self._diag_outer(*rows) + self.prior_precision).float().cpu()

    def _curvature_loss(self, rows: tuple[int, int]) -> Callable[[Tensor], float]:
        if self.groups > 1:
            return self._grouped_loss(rows)
        r0, r1 = rows
        factors: list[Tensor] = []  # this block's G and A on the CPU, formed at the first call

        def form(dW: Tensor) -> float:
            # kept by the loss, so they live as long as the block's inputs (no copy at all for
            # fp32 factors on the CPU)
            if not factors:
                factors.extend((self.G[r0:r1, r0:r1].float().cpu(), self.A.float().cpu()))
            G, A = factors
            # the two products (the cost: out^2 in + out in^2) in fp32, half the time of
            # float64; the elementwise sum in float64
            return float(((G @ dW.float() @ A).double() * dW).sum())

        return form

    def _grouped_loss(self, rows: tuple[int, int]) -> Callable[[Tensor], float]:
        r""":math:`\sum_g \mathrm{tr}(G_{B,g}\, dW_g A_g\, dW_g^\top)` over the groups the
        rows meet (``dW_g``: the block's rows of group ``g``)."""
        from ..rounding import group_pieces

        r0 = rows[0]
        pieces = [(self.G[r0 + a:r0 + b, r0 + a:r0 + b].float().cpu(), self.A[g].float().cpu(),
                   a, b) for g, (a, b) in group_pieces(rows, self.G.shape[0] // self.groups)]

        def form(dW: Tensor) -> float:
            dW32 = dW.float()
            return sum(float(((G @ dW32[a:b] @ A).double() * dW[a:b].double()).sum())
                       for G, A, a, b in pieces)

        return form

    def row_terms(self, rows: tuple[int, int], prior: bool = False) -> RowTerms | None:
        r"""Row ``i``'s term :math:`G_{ii}\, dW_i A\, dW_i^\top` (``+ delta |dW_i|^2``);
        ``None`` for a grouped convolution, whose rows each have their group's ``A``: every
        row is scored (as GPTQ scores them)."""
        if self.groups > 1:
            return None
        r0, r1 = rows
        g = self.G.diagonal()[r0:r1].double().cpu()
        delta = self.prior_precision if prior else 0.0

        def terms(dW: Tensor, idx: Tensor) -> Tensor:
            dW32 = dW.float()
            t = g[idx] * ((dW32 @ self.A.float().cpu()) * dW32).double().sum(1)
            return t + delta * (dW.double() ** 2).sum(1) if prior else t

        return RowTerms(g, terms)

    def rounding_matrix(self, rows: tuple[int, int]) -> Tensor:
        """``A`` (``(groups, cols, cols)`` for a grouped convolution: each row its group's)."""
        return self.A.cpu().float()

    def tied_with(self, other: LayerPosterior) -> LayerPosterior:
        r"""K-FAC of a shared weight: :math:`G_1 \otimes A_1 + G_2 \otimes A_2 \approx
        \bar G \otimes (A_1 + A_2)`, :math:`\bar G` the mean of the live ``G`` (``mean(diag
        G) = 1`` each): each use as extra input rows, K-FAC's own treatment of a layer's
        positions. Exact when the uses share ``G``; a use with ``G = 0`` adds nothing."""
        if not isinstance(other, KronLayerPosterior) or other.A.shape != self.A.shape:
            return super().tied_with(other)
        live = [p for p in (self, other) if float(p.G.diagonal().abs().sum()) > 0]
        if not live:
            return self
        G = sum(p.G for p in live) / len(live)
        A = sum(p.A for p in live)
        return KronLayerPosterior(self.name, self.mean, None, stored(self),
                                  note=_tie_note(self, other), A=A, G=G)

    def sample(self, n: int = 1, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        r"""Draws from :math:`N(\mu, T (G \otimes A + \delta I)^{-1})`.

        With :math:`G = Q_G \mathrm{diag}(g) Q_G^\top` and :math:`A = Q_A \mathrm{diag}(a)
        Q_A^\top`, the precision is diagonal in the Kronecker eigenbasis with eigenvalues
        :math:`g_i a_j + \delta`: ``W = mu + Q_G (Z / sqrt((g a^T + delta) / T)) Q_A^T``; for a
        grouped convolution, group by group (:math:`G_{gg}`, :math:`A_g`).
        """
        QG, QA, lam = self._eigen()
        eps = torch.randn((n, *lam.shape), generator=generator, dtype=torch.float64)
        dW = QG @ (eps * (temperature / lam).sqrt()) @ QA.transpose(-1, -2)
        return self.mean.float().cpu() + dW.float().reshape(n, *self.mean.shape)

    def _eigen(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(Q_G, Q_A, g a^T + delta)``, float64, computed once per layer; for a grouped
        convolution stacked over the groups, ``(groups, per, per)``, ``(groups, cols, cols)``
        and ``(groups, per, cols)``."""
        if self._eig is None:
            G, A = self.G.double().cpu(), self.A.double().cpu()
            if self.groups > 1:
                per = G.shape[0] // self.groups
                G = G.view(self.groups, per, self.groups, per).diagonal(dim1=0, dim2=2)
                G = G.permute(2, 0, 1)  # each group's diagonal block of G
            g, QG = torch.linalg.eigh(G)
            a, QA = torch.linalg.eigh(A)
            self._eig = (QG, QA, g.clamp_min(0).unsqueeze(-1) * a.clamp_min(0).unsqueeze(-2))
        QG, QA, ga = self._eig
        return QG, QA, ga + self.prior_precision

    def output_variance(self, features: Tensor, temperature: float = 1.0) -> Tensor:
        r"""K-FAC: :math:`\mathrm{Var} f_c = T \sum_{i,j} Q_G[c,i]^2\, (Q_A^\top \phi)_j^2 /
        (g_i a_j + \delta)` (the Kronecker eigenbasis diagonalises :math:`\Lambda`)."""
        phi = self._check_features(features)
        QG, QA, lam = self._eigen()
        return temperature * ((phi @ QA).square() @ (1.0 / lam).T) @ QG.square().T


@dataclass(kw_only=True)
class LowRankLayerPosterior(LayerPosterior):
    r"""Low rank plus diagonal: :math:`\Lambda = \mathrm{diag}(d) + U S U^\top + \delta I`.

    ``U`` (n_weights x k, orthonormal columns) and ``S`` (k,) are the top eigenpairs of the
    layer's GGN block, ``residual`` :math:`d` (weight-shaped, >= 0) the rest of its diagonal;
    ``curvature = residual + diag(U S U^T)`` and ``precision = curvature + delta``. For rows
    ``r0:r1`` the score is :math:`\sum d_B\, dW^2 + \|S^{1/2} U_B^\top \mathrm{vec}(dW)\|^2`
    with ``U_B`` the block's rows of ``U`` (the block's diagonal block of :math:`U S U^\top`).
    """

    structure: ClassVar[str] = "lowrank"

    U: Tensor
    S: Tensor
    residual: Tensor
    _svd: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.curvature is None:
            low = (self.U.square() * self.S).sum(1)
            self.curvature = self.residual + low.view_as(self.residual)

    def _curvature_loss(self, rows: tuple[int, int]) -> Callable[[Tensor], float]:
        r0, r1 = rows
        cols = self.residual[0].numel()
        U = self.U[r0 * cols: r1 * cols].cpu().double()
        d, S = _rows(self.residual, rows), self.S.cpu().double()

        def form(dW: Tensor) -> float:
            proj = U.T @ dW.reshape(-1)
            return float((d * dW * dW).sum() + (S * proj * proj).sum())

        return form

    def tied_with(self, other: LayerPosterior) -> LayerPosterior:
        r"""Low rank of a shared weight: :math:`d_1 + d_2` and :math:`U_1 S_1 U_1^\top + U_2
        S_2 U_2^\top = U S U^\top` re-diagonalised exactly (QR of :math:`[U_1\ U_2]`, then
        the small eigenproblem): rank up to :math:`k_1 + k_2`, orthonormal again."""
        if not isinstance(other, LowRankLayerPosterior):
            return super().tied_with(other)
        Q, R = torch.linalg.qr(torch.cat([self.U, other.U], 1).double())
        M = R @ torch.diag(torch.cat([self.S, other.S]).double()) @ R.T
        S, V = torch.linalg.eigh((M + M.T) / 2)
        U = (Q @ V).to(self.U.dtype)
        return LowRankLayerPosterior(self.name, self.mean, torch.zeros_like(self.precision),
                                     self.prior_precision, note=_tie_note(self, other),
                                     U=U, S=S.clamp_min(0).to(self.S.dtype),
                                     residual=self.residual + other.residual,
                                     curvature=None).with_precision()

    def sample(self, n: int = 1, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        r"""Draws from :math:`N(\mu, T \Lambda^{-1})`, :math:`\Lambda = D + U S U^\top`.

        With :math:`D = \mathrm{diag}(d + \delta)` and :math:`V = D^{-1/2} U S^{1/2} = P \Sigma
        R^\top` (thin SVD), :math:`\Lambda = D^{1/2} (I + V V^\top) D^{1/2}`, so
        :math:`L = D^{-1/2} (I + P ((1 + \Sigma^2)^{-1/2} - 1) P^\top)` has :math:`L L^\top =
        \Lambda^{-1}`; a draw is ``mu + sqrt(T) L z``.
        """
        d, P, sv = self._factors()
        z = torch.randn((n, d.numel()), generator=generator, dtype=torch.float64)
        z = z + ((z @ P) * ((1 + sv * sv).rsqrt() - 1)) @ P.T
        draws = z / d.sqrt() * temperature ** 0.5
        return self.mean.float().cpu() + draws.float().reshape(n, *self.mean.shape)

    def _factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(d + delta, P, Sigma)`` of :meth:`sample`'s factorisation, float64, once per layer."""
        if self._svd is None:
            d = self.residual.double().cpu().reshape(-1) + self.prior_precision
            V = (self.U.double().cpu() / d.sqrt().unsqueeze(1)
                 * self.S.double().cpu().clamp_min(0).sqrt())
            P, sv, _ = torch.linalg.svd(V, full_matrices=False)
            self._svd = (d, P, sv)
        return self._svd

    def output_variance(self, features: Tensor, temperature: float = 1.0) -> Tensor:
        r"""Low rank: with :math:`\Lambda^{-1} = D^{-1/2} (I - P\, \mathrm{diag}(\sigma^2 /
        (1 + \sigma^2)) P^\top) D^{-1/2}` (see :meth:`sample`) and :math:`x_c = e_c \otimes
        \phi`, :math:`\mathrm{Var} f_c = T (\sum_j \phi_j^2 / D_{cj} - \sum_k \frac{\sigma_k^2}
        {1 + \sigma_k^2} (P_k^\top D^{-1/2} x_c)^2)`."""
        phi = self._check_features(features)
        d, P, sv = self._factors()
        out, cols = self.mean.shape
        dinv = (1.0 / d).reshape(out, cols)
        proj = torch.einsum("cjk,bj,cj->bck", P.reshape(out, cols, -1), phi, dinv.sqrt())
        shrink = sv.square() / (1 + sv.square())
        return temperature * ((phi * phi) @ dinv.T - (proj.square() * shrink).sum(-1))


def _tie_note(a: LayerPosterior, b: LayerPosterior) -> str:
    note = f"weight shared with {b.name!r}: curvature of both uses"
    return "; ".join(x for x in (a.note, note) if x)


@dataclass
class Posterior:
    """Per-layer posteriors plus how they were obtained (for the report)."""

    layers: dict[str, LayerPosterior]
    structure: str
    prior_precision: float = DeferredAttribute()  # type: ignore[assignment]  # see marglik
    n_data: int
    n_calib: int
    backend: str
    labels: str
    seconds: float
    info: dict = field(default_factory=dict)
