"""The epoch choice of distillation: a gain is kept only where it clears its paired noise."""

from __future__ import annotations

import torch

from bayesq_lightning.distillation import choose_epoch


def test_a_gain_within_the_noise_keeps_the_undistilled_epoch():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(64, generator=g)
    noisy = [base, base + 0.05 * torch.randn(64, generator=g) - 0.002,
             base + 0.05 * torch.randn(64, generator=g) - 0.004]
    c = choose_epoch(noisy, min_gain_se=2.0)
    assert c.lowest != 0 and c.gain > 0  # one epoch does look better...
    assert c.epoch == 0 and c.gain < 2 * c.gain_se  # ...by less than its noise
    assert choose_epoch(noisy, min_gain_se=0.0).epoch == c.lowest  # any gain, without the test


def test_a_clear_gain_keeps_the_earliest_lowest_epoch():
    g = torch.Generator().manual_seed(1)
    base = torch.rand(64, generator=g) + 1.0
    better = base - 0.5 + 0.01 * torch.randn(64, generator=g)
    c = choose_epoch([base, base - 0.2, better, better.clone()], min_gain_se=2.0)
    assert (c.epoch, c.lowest) == (2, 2)
    assert c.gain > 2 * c.gain_se


def test_no_epoch_below_the_first_keeps_it():
    base = torch.rand(32)
    c = choose_epoch([base, base + 0.1], min_gain_se=2.0)
    assert (c.epoch, c.lowest, c.gain, c.gain_se) == (0, 0, 0.0, 0.0)


def test_labels_veto_a_kl_gain_without_a_clear_holdout_nll_gain():
    g = torch.Generator().manual_seed(2)
    base = torch.rand(64, generator=g) + 1.0
    kls = [base, base - 0.5 + 0.01 * torch.randn(64, generator=g)]  # a clear KL gain
    nll0 = torch.rand(64, generator=g)
    noise = 0.02 * torch.randn(64, generator=g)
    worse, better = [nll0, nll0 + 0.01 + noise], [nll0, nll0 - 0.02 + noise]
    c = choose_epoch(kls, min_gain_se=2.0, nlls=worse)
    assert (c.epoch, c.lowest) == (0, 1) and c.nll_gain < 0
    c = choose_epoch(kls, min_gain_se=2.0, nlls=better)
    assert c.epoch == 1 and c.nll_gain > 2 * c.nll_gain_se
    unclear = [nll0, nll0 - 0.003 + noise]  # a gain on the labels, within their noise
    c = choose_epoch(kls, min_gain_se=2.0, nlls=unclear)
    assert c.epoch == 0 and 0 < c.nll_gain < 2 * c.nll_gain_se
    assert choose_epoch(kls, min_gain_se=2.0).nll_gain is None  # unlabelled: the KL rule alone
