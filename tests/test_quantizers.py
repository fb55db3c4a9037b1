from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from bayesq_lightning.quantizers import (
    check_bits,
    dequantize,
    design_nonuniform,
    design_uniform,
    expected_sq_error_levels,
    expected_sq_error_uniform,
    lloyd_max,
)
from bayesq_lightning.quantizers.mixture import SortedMixture
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
    expected = design_uniform(w, 3, precision=lam, range_objective="expected")
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


# --------------------------------------------------------------------------------------------
# Non-uniform quantizer
# --------------------------------------------------------------------------------------------


def _nearest_levels(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Nearest-level quantization with thresholds at the midpoints, cells (t_{k-1}, t_k]."""
    t = 0.5 * (levels[1:] + levels[:-1])
    return levels[torch.searchsorted(t, w.contiguous())]


def _hazen_init(x: torch.Tensor, n_levels: int) -> torch.Tensor:
    probs = (np.arange(n_levels) + 0.5) / n_levels
    return torch.tensor(np.quantile(x.numpy(), probs, method="hazen"), dtype=D)


def _plain_lloyd(x: torch.Tensor, levels: torch.Tensor, n_iter: int) -> torch.Tensor:
    """Textbook 1-D Lloyd (k-means): midpoint thresholds, cell means, empty cells kept."""
    n_levels = levels.numel()
    for _ in range(n_iter):
        k = torch.searchsorted(0.5 * (levels[1:] + levels[:-1]), x)
        count = torch.bincount(k, minlength=n_levels).to(D)
        total = torch.bincount(k, x, minlength=n_levels)
        levels = torch.where(count > 0, total / count.clamp_min(1), levels)
    return levels


@pytest.mark.parametrize(("bits", "distortion"), [(2, 0.117482), (3, 0.0345478), (4, 0.0095010)])
def test_lloyd_max_standard_normal(bits, distortion):
    # one weight w ~ N(0, 1): posterior-weighted Lloyd-Max is classical Lloyd-Max (Max, 1960)
    grid = design_nonuniform(torch.zeros(1, 1, dtype=D), bits, precision=torch.ones(1, 1, dtype=D),
                             max_iter=2000, tol=1e-12)
    assert grid.converged and grid.levels.dtype == D
    levels = grid.levels
    torch.testing.assert_close(levels, -levels.flip(0), rtol=0, atol=1e-7)  # symmetric
    found = expected_sq_error_levels(torch.zeros(1, dtype=D), torch.ones(1, dtype=D), levels)
    assert abs(found.item() - distortion) / distortion < 1e-3


def test_tiny_variance_lloyd_max_is_plain_lloyd():
    n_levels, n_iter, sigma = 16, 30, 1e-6
    x = torch.randn(1000, generator=torch.Generator().manual_seed(25), dtype=D)
    init = _hazen_init(x, n_levels)
    ref = _plain_lloyd(x, init, n_iter)
    # Precondition: along the reference trajectory no weight lies within 6 sigma of a
    # threshold, where a Gaussian of width sigma would legitimately be split between two cells.
    levels = init
    for _ in range(n_iter):
        t = 0.5 * (levels[1:] + levels[:-1])
        assert (x[:, None] - t[None]).abs().min() > 6 * sigma
        levels = _plain_lloyd(x, levels, 1)
    # equal precisions, tiny variances: the posterior-weighted iteration is plain Lloyd
    res = lloyd_max(x, n_levels, sigma=torch.full_like(x, sigma), weight=torch.full_like(x, 1e12),
                    init=init, max_iter=n_iter, tol=0.0)
    assert res.n_iter == n_iter
    torch.testing.assert_close(res.levels, ref, rtol=0, atol=1e-12)
    # point masses (precision=None): the default initialisation is the "hazen" quantile rule
    torch.testing.assert_close(lloyd_max(x, n_levels, max_iter=0).levels, init, rtol=0,
                               atol=1e-14)
    plain = lloyd_max(x, n_levels, max_iter=n_iter, tol=0.0)
    torch.testing.assert_close(plain.levels, ref, rtol=0, atol=1e-12)
    grid = design_nonuniform(x.view(10, 100), 4, max_iter=n_iter, tol=0.0)
    torch.testing.assert_close(grid.levels, ref, rtol=0, atol=1e-12)


def _dense_lloyd_max(mu, sigma, lam, levels, n_iter):
    """Reference weighted Lloyd-Max with n x L truncated-normal moments (small n only)."""
    for _ in range(n_iter):
        t = 0.5 * (levels[1:] + levels[:-1])
        edges = torch.cat([t.new_tensor([-math.inf]), t, t.new_tensor([math.inf])])
        z = (edges[None, :] - mu[:, None]) / sigma[:, None]  # (n, L + 1)
        cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        mass = cdf[:, 1:] - cdf[:, :-1]
        first = mu[:, None] * mass + sigma[:, None] * (pdf[:, :-1] - pdf[:, 1:])
        s0, s1 = (lam[:, None] * mass).sum(0), (lam[:, None] * first).sum(0)
        levels = torch.where(s0 > 0, s1 / s0, levels)
    return levels


def test_lloyd_max_matches_dense_reference_on_wide_and_narrow_posteriors():
    g = torch.Generator().manual_seed(5)
    n = 400
    mu = torch.randn(n, generator=g, dtype=D) * 0.1
    # narrow (exact runs) and wide (tabulated) posteriors in one mixture
    sigma = torch.where(torch.arange(n) % 2 == 0, 1e-3, 0.05) * torch.exp(
        0.3 * torch.randn(n, generator=g, dtype=D))
    lam = sigma**-2
    mix = SortedMixture(mu[None], sigma[None], lam[None], n_points=8, n_queries=40)
    assert mix.seg_row.numel() > 0 and mix.grid is not None  # both evaluation paths in use
    init = torch.linspace(-0.2, 0.2, 8, dtype=D)
    res = lloyd_max(mu, 8, sigma=sigma, weight=lam, init=init, max_iter=20, tol=0.0)
    ref = _dense_lloyd_max(mu, sigma, lam, init, 20)
    torch.testing.assert_close(res.levels, ref, rtol=0, atol=1e-7)
    # per-row codebooks: every row is its own mixture
    rows = lloyd_max(torch.stack([mu, 2 * mu]), 8, sigma=torch.stack([sigma, 2 * sigma]),
                     weight=torch.stack([lam, lam / 4]), init=torch.stack([init, 2 * init]),
                     max_iter=20, tol=0.0)
    torch.testing.assert_close(rows.levels[0], ref, rtol=0, atol=1e-7)
    torch.testing.assert_close(rows.levels[1], 2 * ref, rtol=0, atol=2e-7)


def _mc_levels(mu, sigma, levels, n=100_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = mu[:, None] + sigma[:, None] * torch.randn(len(mu), n, generator=g, dtype=D)
    return ((_nearest_levels(w, levels) - w) ** 2).mean(1)


@pytest.mark.parametrize("n_levels", [4, 16])
def test_levels_closed_form_matches_monte_carlo(n_levels):
    g = torch.Generator().manual_seed(n_levels)
    levels = torch.sort(torch.rand(n_levels, generator=g, dtype=D) * 2 - 1).values
    mu = (torch.rand(24, generator=g, dtype=D) - 0.5) * 1.2
    # sigma from a small fraction of a cell to several cells, capped so that a 1e5-sample
    # estimate is not ruled by rare tails beyond the outer levels
    sigma = torch.exp(torch.empty(24, dtype=D).uniform_(-6.0, -1.9, generator=g))
    exact = expected_sq_error_levels(mu, sigma, levels)
    mc = _mc_levels(mu, sigma, levels)
    assert ((exact - mc).abs() / mc).max() < 0.02
    # per-row level sets: row r of mu uses levels[r]
    per_row = expected_sq_error_levels(mu.view(2, 12), sigma.view(2, 12),
                                       torch.stack([levels, levels + 0.1]))
    torch.testing.assert_close(per_row[0], exact[:12])
    torch.testing.assert_close(per_row[1], expected_sq_error_levels(mu[12:], sigma[12:],
                                                                    levels + 0.1))
    # sigma = 0: the point value
    point = expected_sq_error_levels(mu, torch.zeros_like(mu), levels)
    torch.testing.assert_close(point, (_nearest_levels(mu, levels) - mu) ** 2)


def test_levels_closed_form_matches_uniform_grid():
    g = torch.Generator().manual_seed(7)
    scale, zero, n_levels = torch.tensor(0.125, dtype=D), torch.tensor(7.3, dtype=D), 16
    levels = (torch.arange(n_levels, dtype=D) - zero) * scale
    mu = torch.randn(500, generator=g, dtype=D)
    sigma = scale * torch.exp(torch.empty(500, dtype=D).uniform_(-4, 2, generator=g))
    torch.testing.assert_close(
        expected_sq_error_levels(mu, sigma, levels),
        expected_sq_error_uniform(mu, sigma, scale, zero, n_levels),
        rtol=1e-10, atol=1e-15,
    )


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_design_nonuniform_codes_and_codebook(bits, per_row, weighted):
    g = torch.Generator().manual_seed(bits)
    rows, cols, n_levels = 6, 300, 2**bits
    w = torch.randn(rows, cols, generator=g) * 0.1
    lam = torch.exp(torch.randn(rows, cols, generator=g) * 2) * 1e3 if weighted else None
    grid = design_nonuniform(w, bits, precision=lam, per_row=per_row)
    assert grid.codebook.dtype == torch.float16
    assert grid.codebook.shape == ((rows, n_levels) if per_row else (n_levels,))
    assert grid.levels.shape == grid.codebook.shape and grid.levels.dtype == D
    assert bool((grid.codebook[..., 1:] >= grid.codebook[..., :-1]).all())  # sorted
    assert grid.codes.dtype == torch.uint8 and grid.codes.shape == (rows, cols)
    assert int(grid.codes.max()) < n_levels
    block = BlockResult((0, rows), bits, "nonuniform", None, grid.codes, codebook=grid.codebook)
    q = dequantize(block)
    for r in range(rows):
        assert q[r].unique().numel() <= n_levels
    # every code is the nearest stored (fp16) level of the weight
    book = grid.codebook.float()
    book = book[:, None, :] if per_row else book
    nearest = (w[:, :, None] - book).abs().amin(-1)
    assert torch.equal((q - w).abs(), nearest)


def test_precision_weighted_codebook_beats_unweighted():
    g = torch.Generator().manual_seed(3)
    # two clusters; the right one is 1000x more precisely determined
    w = torch.cat([-0.5 + 0.1 * torch.randn(600, generator=g),
                   0.5 + 0.1 * torch.randn(600, generator=g)]).view(12, 100)
    lam = torch.cat([torch.full((600,), 1e2), torch.full((600,), 1e5)]).view(12, 100)

    def risks(grid):
        block = BlockResult((0, 12), 2, "nonuniform", None, grid.codes, codebook=grid.codebook)
        deployed = float((lam * (dequantize(block) - w) ** 2).sum())
        expected = float((lam * expected_sq_error_levels(
            w.double(), lam.double().rsqrt(), grid.codebook.double())).sum())
        return deployed, expected

    weighted, plain = risks(design_nonuniform(w, 2, precision=lam)), risks(design_nonuniform(w, 2))
    assert weighted[1] < 0.7 * plain[1]  # the whitened posterior-expected distortion
    assert weighted[0] < 0.7 * plain[0]  # and the deployed risk


def test_design_nonuniform_large_layer_is_not_dense():
    # 2**8 levels over 200k weights with wide posteriors: an n x L evaluation would allocate
    # 204,800 x 256 float64 terms (419 MB) per iteration; the sorted/tabulated mixture never
    # allocates more than a chunk at a time
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 3200, generator=g) * 0.02
    lam = (0.004 * torch.exp(0.7 * torch.randn(64, 3200, generator=g))) ** -2
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        grid = design_nonuniform(w, 8, precision=lam, max_iter=10)
    largest = max(e.cpu_memory_usage for e in prof.events())
    dense = w.numel() * 256 * 8
    assert 0 < largest < dense / 20, (largest, dense)
    assert grid.codebook.shape == (256,) and int(grid.codes.max()) < 256
    assert torch.isfinite(grid.levels).all()


@pytest.mark.parametrize("tabulated", [False, True])
def test_mixture_partial_sums_match_brute_force(tabulated):
    # G0(t) = sum lam Phi(z), G1(t) = sum lam (mu Phi(z) - sigma phi(z)), z = (t - mu) / sigma
    g = torch.Generator().manual_seed(11)
    mu = torch.randn(3, 500, generator=g, dtype=D) * 0.1
    sigma = 0.02 * torch.exp(torch.randn(3, 500, generator=g, dtype=D))
    lam = sigma**-2
    points = torch.sort(torch.randn(3, 9, generator=g, dtype=D) * 0.15, dim=1).values
    # the cost model picks the path: one query (exact runs) or very many (tabulated grid)
    mix = SortedMixture(mu, sigma, lam, n_points=9, n_queries=10**6 if tabulated else 1)
    assert (mix.grid is not None) == tabulated and (mix.seg_row.numel() == 0) == tabulated
    g0, g1 = mix.cdf(points)
    z = (points[:, None, :] - mu[:, :, None]) / sigma[:, :, None]
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    ref0 = (lam[:, :, None] * cdf).sum(1)
    ref1 = (lam[:, :, None] * (mu[:, :, None] * cdf - sigma[:, :, None] * pdf)).sum(1)
    scale0 = lam.sum(1, keepdim=True)
    scale1 = (lam * (mu.abs() + sigma)).sum(1, keepdim=True)
    assert ((g0 - ref0).abs() / scale0).max() < 1e-8
    assert ((g1 - ref1).abs() / scale1).max() < 1e-8


def test_empty_cells_keep_their_level():
    x = torch.tensor([-0.3, -0.1, 0.1, 0.3], dtype=D).repeat(10)
    init = torch.tensor([-5.0, -0.2, 0.2, 5.0], dtype=D)  # the outer cells hold no weight
    for sigma in (None, torch.full_like(x, 1e-3)):
        res = lloyd_max(x, 4, sigma=sigma, init=init, max_iter=5, tol=0.0)
        torch.testing.assert_close(res.levels, torch.tensor([-5.0, -0.2, 0.2, 5.0], dtype=D))


def test_nonuniform_deployed_objective_is_weighted_kmeans_on_the_means():
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(4, 64, generator=g) * 0.05
    lam = torch.full_like(mu, 1.0)  # sigma = 1: a posterior far wider than the weights
    expected = design_nonuniform(mu, 2, precision=lam, range_objective="expected")
    deployed = design_nonuniform(mu, 2, precision=lam, range_objective="deployed")
    plain = design_nonuniform(mu, 2)
    torch.testing.assert_close(deployed.codebook, plain.codebook)  # equal weights: k-means
    assert deployed.codebook.float().abs().max() <= mu.abs().max() + 1e-3
    assert expected.codebook.float().abs().max() > 10 * mu.abs().max()  # mixture of N(mu, 1)
    with pytest.raises(ValueError, match="objective"):
        design_nonuniform(mu, 2, precision=lam, range_objective="nope")


def test_tiny_range_rows_get_their_ideal_fp16_step():
    """An 8-bit row spanning 0.006 gets step 0.006 / 255 (a subnormal fp16), not fp16's smallest
    normal 6.1e-5 (2.5x coarser); an all-zero row still gets a finite grid that decodes to 0."""
    from bayesq_lightning.quantizers.uniform import design_uniform

    torch.manual_seed(0)
    row = torch.linspace(-0.003, 0.003, 64)[torch.randperm(64)]
    mu = torch.stack([row, torch.zeros(64)])
    grid = design_uniform(mu, 8)
    step = grid.scale.float()[:, 0]
    assert step[0] == pytest.approx(0.006 / 255, rel=5e-3)
    assert torch.isfinite(grid.zero.float()).all() and torch.isfinite(step).all()
    deq = (grid.codes.float() - grid.zero.float()) * grid.scale.float()
    assert (deq[0] - mu[0]).abs().max() <= 0.5 * step[0] * 1.01 + 1e-9
    assert torch.equal(deq[1], torch.zeros(64))
