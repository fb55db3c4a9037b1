from __future__ import annotations

import pytest
import torch
from scipy.optimize import minimize_scalar

from bayesq_lightning.quantizers import (
    check_bits,
    dequantize,
    design_uniform,
    expected_sq_error_uniform,
)
from bayesq_lightning.result import BlockResult

D = torch.float64


def _mc(mu, sigma, scale, zero, levels, n=100_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = mu[:, None] + sigma[:, None] * torch.randn(len(mu), n, generator=g, dtype=D)
    q = scale * (torch.clamp(torch.round(w / scale + zero), 0, levels - 1) - zero)
    return ((q - w) ** 2).mean(1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_closed_form_matches_monte_carlo(bits):
    g = torch.Generator().manual_seed(bits)
    levels = 2**bits
    scale = torch.tensor(2.0 / levels, dtype=D)
    zero = torch.tensor((levels - 1) / 2 + 0.3, dtype=D)
    mu = (torch.rand(24, generator=g, dtype=D) - 0.5) * 1.2
    # sigma from a tenth of a step to several steps (both evaluation regimes), capped so that a
    # 1e5-sample estimate is not ruled by rare clipped tails beyond the grid's +-1 range
    sigma = scale * torch.exp(torch.empty(24, dtype=D).uniform_(-2.3, 2.5, generator=g))
    sigma = sigma.clamp_max(0.15)
    exact = expected_sq_error_uniform(mu, sigma, scale, zero, levels)
    mc = _mc(mu, sigma, scale, zero, levels)
    assert ((exact - mc).abs() / mc).max() < 0.02


def test_closed_form_point_mass_limit():
    mu = torch.tensor([0.013, -0.31, 0.27], dtype=D)
    scale, zero = torch.tensor(0.1, dtype=D), torch.tensor(3.5, dtype=D)
    exact = expected_sq_error_uniform(mu, torch.full_like(mu, 1e-9), scale, zero, 8)
    q = scale * (torch.clamp(torch.round(mu / scale + zero), 0, 7) - zero)
    torch.testing.assert_close(exact, (q - mu) ** 2, rtol=1e-6, atol=1e-15)


@pytest.mark.parametrize(("bits", "step"), [(2, 0.9957), (3, 0.5860), (4, 0.3352)])
def test_optimal_uniform_step_for_standard_normal(bits, step):
    levels = 2**bits
    mid_rise = torch.tensor((levels - 1) / 2, dtype=D)

    def distortion(s: float) -> float:
        return expected_sq_error_uniform(
            torch.zeros(1, dtype=D), torch.ones(1, dtype=D), torch.tensor(s, dtype=D),
            mid_rise, levels,
        ).item()

    found = minimize_scalar(distortion, bounds=(0.05, 2.0), method="bounded",
                            options={"xatol": 1e-8}).x
    assert abs(found - step) < 1e-3


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("weighted", [False, True])
def test_design_uniform_codes_and_levels(bits, weighted):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 40, generator=g) * 0.1
    lam = torch.rand(6, 40, generator=g) * 100 + 1 if weighted else None
    grid = design_uniform(w, bits, precision=lam)
    assert grid.scale.dtype == torch.float16 and grid.zero.dtype == torch.float16
    assert grid.codes.dtype == torch.uint8 and int(grid.codes.max()) < 2**bits
    block = BlockResult((0, 6), bits, "uniform", None, grid.codes, grid.scale, grid.zero)
    q = dequantize(block)
    for row in q:
        assert row.unique().numel() <= 2**bits
    # codes are the nearest level of the stored (fp16) grid
    levels = (torch.arange(2**bits).float()[None] - grid.zero.float()) * grid.scale.float()
    nearest = (w[:, :, None] - levels[:, None, :]).abs().argmin(-1)
    assert torch.equal(nearest.clamp(0, 2**bits - 1).to(torch.uint8), grid.codes)


def test_range_search_never_worse_than_min_max():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 256, generator=g) * 0.05
    w[:, 0] = 0.6  # an outlier per row: min-max wastes levels on it
    lam = torch.rand(8, 256, generator=g) * 50 + 1

    def risk(grid):
        block = BlockResult((0, 8), 3, "uniform", None, grid.codes, grid.scale, grid.zero)
        return float((lam * (dequantize(block) - w) ** 2).sum())

    searched, minmax = design_uniform(w, 3, precision=lam), design_uniform(w, 3)
    assert risk(searched) < 0.8 * risk(minmax)
    expected = design_uniform(w, 3, precision=lam, objective="expected")
    assert risk(expected) <= risk(minmax) + 1e-6


@pytest.mark.parametrize("bad", [1, 5, 16, 2.5, True, "4"])
def test_unsupported_bits_are_refused(bad):
    with pytest.raises(ValueError, match="unsupported bit-width"):
        check_bits(bad)


def test_grouped_scales_with_short_last_group():
    w = torch.randn(3, 10)
    grid = design_uniform(w, 4, group_size=4)
    assert grid.scale.shape == (3, 3)
    block = BlockResult((0, 3), 4, "uniform", 4, grid.codes, grid.scale, grid.zero)
    assert (dequantize(block) - w).abs().max() < 0.2
