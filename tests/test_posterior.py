from __future__ import annotations

import pytest
import torch
from conftest import assert_unchanged, snapshot

from bayesq_lightning.batches import calibration_samples
from bayesq_lightning.layers import quantizable_layers
from bayesq_lightning.posterior import fit_posterior


def _curvature(post, delta):
    """Total rescaled GGN curvature per layer (precision minus prior)."""
    return {n: float((lp.precision - delta).sum()) for n, lp in post.layers.items()}


def test_posterior_does_not_depend_on_calibration_size(trained, loader):
    names = [n for n, _ in quantizable_layers(trained)]
    batches, n = calibration_samples(loader, 8)
    assert n == 256
    full = fit_posterior(trained, batches, names, n_data=5000, prior_precision=1.0)
    half = fit_posterior(trained, batches[:4], names, n_data=5000, prior_precision=1.0)
    double = fit_posterior(trained, batches, names, n_data=10000, prior_precision=1.0)
    assert full.n_calib == 256 and half.n_calib == 128
    c_full, c_half, c_double = (_curvature(p, 1.0) for p in (full, half, double))
    for name in names:
        assert c_half[name] == pytest.approx(c_full[name], rel=0.25)
        assert c_double[name] == pytest.approx(2 * c_full[name], rel=1e-4)


def test_posterior_fields_and_prior_by_marglik(trained, loader):
    names = [n for n, _ in quantizable_layers(trained)]
    before = snapshot(trained)
    batches, _ = calibration_samples(loader, 4)
    post = fit_posterior(trained, batches, names, n_data=1000)
    assert_unchanged(trained, before)
    assert post.structure == "diag" and post.labels == "given"
    assert post.prior_precision > 0 and post.prior_precision != 1.0
    modules = dict(trained.named_modules())
    for name in names:
        lp = post.layers[name]
        assert torch.equal(lp.mean, modules[name].weight)
        assert lp.precision.shape == lp.mean.shape
        assert (lp.precision >= post.prior_precision * (1 - 1e-6)).all()


def test_unlabelled_calibration_uses_model_predictions(trained, loader):
    names = [n for n, _ in quantizable_layers(trained)]
    xs = [x for x, _ in loader][:2]
    post = fit_posterior(trained, xs, names, n_data=500, prior_precision=2.0)
    assert post.labels == "model predictions"
