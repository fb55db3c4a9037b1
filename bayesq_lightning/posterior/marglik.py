r"""The prior precision :math:`\delta` by marginal likelihood, solved exactly in one dimension.

With a prior :math:`\mathcal N(0, \delta^{-1} I)` over :math:`P` parameters and a Laplace
posterior whose curvature has eigenvalues :math:`h_i` (the diagonal itself, or the products
:math:`\lambda^G_a \lambda^A_b` of a K-FAC layer's factor eigenvalues), the Laplace log marginal
likelihood depends on :math:`\delta` only through

.. math::

    f(\delta) = -\tfrac12 \Big[\sum_i \log(h_i + \delta) - P \log\delta
                + \delta\, \|\theta\|^2\Big]

(laplace-torch's ``log_marginal_likelihood`` with a scalar prior, less the terms free of
:math:`\delta`). Its stationary point is MacKay's condition

.. math::

    \gamma(\delta) = \delta\, \|\theta\|^2, \qquad
    \gamma(\delta) = \sum_i \frac{h_i}{h_i + \delta}

(:math:`\gamma`: the effective number of parameters). With :math:`t = \log\delta`,
:math:`\varphi(t) = \gamma(e^t) - e^t \|\theta\|^2` decreases strictly, so the maximiser is its
unique root: Newton's method in :math:`t`, kept inside a bracket by bisection, about ten passes
over the eigenvalues. laplace-torch's own ``optimize_prior_precision`` takes 100 Adam steps on
:math:`t` with autograd, each a pass over every eigenvalue, and is still short of the optimum
when it lies more than about ten units of :math:`t` from its start.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Spectrum = Sequence[Tensor | tuple[Tensor, Tensor]]
"""Curvature eigenvalues: 1-D tensors, or pairs whose outer product holds them (K-FAC)."""

class Deferred:
    """A number computed on its first read, once: the marginal-likelihood ``delta`` of a
    K-FAC posterior, whose spectrum (an eigensolve of every factor) the default quantization
    never reads. The closure holds the factors until then and is dropped after."""

    def __init__(self, compute: Callable[[], float]) -> None:
        self._compute: Callable[[], float] | None = compute
        self._value: float | None = None

    @property
    def known(self) -> bool:
        return self._value is not None

    def get(self) -> float:
        if self._value is None:
            self._value = float(self._compute())
            self._compute = None
        return self._value


class DeferredAttribute:
    """An attribute (or dataclass field, with no default) that holds a number or a
    :class:`Deferred` and reads as the number; :func:`stored` gives what it holds."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = "_" + name

    def __get__(self, obj, owner=None) -> float:
        if obj is None:  # no class-level value: a dataclass field without a default
            raise AttributeError(self.key[1:])
        return resolved(obj.__dict__[self.key])

    def __set__(self, obj, value: float | Deferred) -> None:
        obj.__dict__[self.key] = value


def stored(obj: object, name: str = "prior_precision") -> float | Deferred:
    """What a :class:`DeferredAttribute` of ``obj`` holds, without computing it."""
    return obj.__dict__["_" + name]


def resolved(value: float | Deferred) -> float:
    """``value``, computing it if deferred."""
    return value.get() if isinstance(value, Deferred) else value


def known(value: float | Deferred) -> float | None:
    """``value`` if it is a number already, else ``None`` (nothing computed)."""
    if isinstance(value, Deferred):
        return value.get() if value.known else None
    return value


T_MIN, T_MAX = -40.0, 40.0  # log delta: beyond these the optimum is at 0 or infinity


CHUNK = 1 << 22  # eigenvalues formed at once (a K-FAC layer's outer product, in row chunks)


def _pieces(spectrum: Spectrum):
    for piece in spectrum:
        if isinstance(piece, tuple):
            lg, la = piece
            step = max(1, CHUNK // max(1, la.numel()))
            for i in range(0, lg.numel(), step):
                yield torch.outer(lg[i:i + step], la).reshape(-1)
        else:
            yield piece


def _gamma(spectrum: Spectrum, delta: float) -> tuple[float, float]:
    r""":math:`\gamma(\delta)` and :math:`\sum_i h_i / (h_i + \delta)^2`."""
    g = dg = 0.0
    for h in _pieces(spectrum):
        r = h / (h + delta)
        g += float(r.sum())
        dg += float((r / (h + delta)).sum())
    return g, dg


def spectrum_size(spectrum: Spectrum) -> int:
    return sum(p[0].numel() * p[1].numel() if isinstance(p, tuple) else p.numel()
               for p in spectrum)


def marglik_prior_precision(spectrum: Spectrum, theta_sq: float, n_params: int,
                            tol: float = 1e-9) -> float:
    r"""The scalar prior precision that maximises the Laplace marginal likelihood.

    Parameters
    ----------
    spectrum : sequence of Tensor or (Tensor, Tensor)
        Eigenvalues :math:`h_i` of the curvature (at the ``n_data`` scale, without the prior):
        1-D tensors, or pairs ``(l_G, l_A)`` standing for ``outer(l_G, l_A)``. Round-off below
        zero is clipped to zero.
    theta_sq : float
        :math:`\|\theta\|^2`, the squared norm of the posterior mean (prior mean 0).
    n_params : int
        :math:`P`; must equal the number of eigenvalues.
    tol : float
        Stop when a step in :math:`t = \log\delta` is below ``tol``.

    Returns
    -------
    float
        :math:`\delta`, within :math:`[e^{-40}, e^{40}]` (the bound where the optimum lies
        beyond it: no curvature, or all-zero weights); NaN when an eigenvalue or the weights are
        not finite (the posterior's finiteness check then names the layers).
    """
    if spectrum_size(spectrum) != n_params:
        raise ValueError(f"the spectrum holds {spectrum_size(spectrum)} eigenvalues but the "
                         f"posterior has {n_params} parameters")
    spectrum = [tuple(x.detach().double().clamp(min=0) for x in p) if isinstance(p, tuple)
                else p.detach().double().clamp(min=0).reshape(-1) for p in spectrum]
    if not math.isfinite(theta_sq) or not all(
            torch.isfinite(x).all() for p in spectrum for x in (p if isinstance(p, tuple) else (p,))):
        return math.nan  # the fit's finiteness check names the layers and the cause

    def phi(t: float) -> tuple[float, float]:
        delta = math.exp(t)
        g, dg = _gamma(spectrum, delta)
        return g - delta * theta_sq, -delta * (dg + theta_sq)

    lo, hi, t = T_MIN, T_MAX, 0.0
    for _ in range(200):
        f, df = phi(t)
        if f > 0:
            lo = t
        else:
            hi = t
        step = -f / df if df < 0 else math.inf
        new = t + step
        if not lo < new < hi:  # Newton left the bracket: bisect
            new = (lo + hi) / 2
        if abs(new - t) < tol or hi - lo < tol:
            t = new
            break
        t = new
    return math.exp(min(max(t, T_MIN), T_MAX))
