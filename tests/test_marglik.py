"""The exact 1-D prior-precision fit against laplace-torch's own marginal likelihood."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayesq_lightning.posterior.fit import import_laplace
from bayesq_lightning.posterior.marglik import marglik_prior_precision


def _f(h: torch.Tensor, theta_sq: float, delta: float) -> float:
    """The delta-dependent part of the Laplace log marginal likelihood."""
    h = h.double()
    return -0.5 * float(torch.log(h + delta).sum() - h.numel() * math.log(delta)
                        + delta * theta_sq)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_maximises_the_objective_on_a_grid(scale):
    g = torch.Generator().manual_seed(0)
    h = torch.rand(500, generator=g) ** 4 * scale
    theta_sq = 37.0
    delta = marglik_prior_precision([h], theta_sq, 500)
    grid = [delta * math.exp(k / 50) for k in range(-200, 201)]
    best = max(grid, key=lambda d: _f(h, theta_sq, d))
    assert best == pytest.approx(delta, rel=0.03)
    # the stationary condition gamma(delta) = delta * |theta|^2 holds
    assert float((h / (h + delta)).sum()) == pytest.approx(delta * theta_sq, rel=1e-6)


def test_kronecker_pairs_equal_their_expanded_products():
    g = torch.Generator().manual_seed(1)
    la, lb, d = torch.rand(7, generator=g), torch.rand(5, generator=g) * 30, torch.rand(3)
    pairs = marglik_prior_precision([(la, lb), d], 2.5, 38)
    flat = marglik_prior_precision([torch.outer(la, lb).reshape(-1), d], 2.5, 38)
    assert pairs == pytest.approx(flat, rel=1e-9)


def test_bounds_and_mismatch():
    # all-zero weights: the optimum is an infinite precision, returned as the bound
    assert marglik_prior_precision([torch.ones(4)], 0.0, 4) == pytest.approx(math.exp(40))
    # no curvature: the data determine nothing, f = -delta |theta|^2 / 2 peaks at delta -> 0
    assert marglik_prior_precision([torch.zeros(4)], 2.0, 4) == pytest.approx(math.exp(-40))
    with pytest.raises(ValueError, match="holds 4 eigenvalues but the posterior has 5"):
        marglik_prior_precision([torch.ones(4)], 1.0, 5)
    assert math.isnan(marglik_prior_precision([torch.tensor([1.0, math.nan])], 1.0, 2))


def test_chunked_outer_products_equal_one_piece(monkeypatch):
    import bayesq_lightning.posterior.marglik as marglik

    g = torch.Generator().manual_seed(2)
    pair = (torch.rand(9, generator=g), torch.rand(7, generator=g) * 5)
    whole = marglik.marglik_prior_precision([pair], 3.0, 63)
    monkeypatch.setattr(marglik, "CHUNK", 10)  # rows of the outer product in chunks of one
    assert marglik.marglik_prior_precision([pair], 3.0, 63) == pytest.approx(whole, rel=1e-12)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_at_least_as_good_as_laplace_torch_adam(structure):
    """laplace-torch computes the marginal likelihood itself; ours is its maximiser."""
    import_laplace()
    from laplace import Laplace

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    x, y = torch.randn(48, 6), torch.randint(0, 3, (48,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    la = Laplace(net, "classification", subset_of_weights="all", hessian_structure=structure)
    la.fit(loader)
    if structure == "diag":
        spectrum = [la.H]
    else:
        spectrum = [tuple(torch.linalg.eigvalsh(f) for f in F) if len(F) == 2
                    else torch.linalg.eigvalsh(F[0]) for F in la.H_facs.kfacs]
    ours = marglik_prior_precision(spectrum, float(la.mean.double().square().sum()),
                                   la.n_params)

    def lml(delta: float) -> float:
        return float(la.log_marginal_likelihood(prior_precision=torch.tensor([delta])))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")
    adam = float(la.prior_precision)
    assert lml(ours) >= lml(adam) - 1e-6 * abs(lml(adam))
    assert lml(ours) >= max(lml(ours * 1.05), lml(ours / 1.05))


def test_kfac_delta_is_solved_only_when_read(monkeypatch):
    """The default quantization never reads K-FAC's prior precision: no spectrum, no solve;
    the first read solves it once, from the factors the posterior holds."""
    from bayesq_lightning import BayesQConfig, quantize_model
    from bayesq_lightning.posterior import fit as fit_module
    from bayesq_lightning.posterior.kron_factors import KronFactors

    calls = {"solve": 0, "spectrum": 0}
    solve, spectrum = fit_module.marglik_prior_precision, KronFactors.spectrum

    def counted_solve(*args):
        calls["solve"] += 1
        return solve(*args)

    def counted_spectrum(self):
        calls["spectrum"] += 1
        return spectrum(self)

    monkeypatch.setattr(fit_module, "marglik_prior_precision", counted_solve)
    monkeypatch.setattr(KronFactors, "spectrum", counted_spectrum)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4))
    x, y = torch.randn(48, 32), torch.randint(0, 4, (48,))
    res = quantize_model(net, DataLoader(TensorDataset(x, y), batch_size=16),
                         BayesQConfig(bits=4.0), progress=False)
    assert res.info["structure"] == "kron" and res.info["prior_precision"] is None
    assert calls == {"solve": 0, "spectrum": 0}
    delta = res.posterior.prior_precision
    assert calls == {"solve": 1, "spectrum": 1} and math.isfinite(delta) and delta > 0
    layer = res.posterior.layers["0"]
    assert layer.prior_precision == delta and calls["solve"] == 1  # one solve, shared
