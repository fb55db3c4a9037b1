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
