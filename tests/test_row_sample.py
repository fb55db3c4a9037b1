"""Candidates compared on a row sample (``score_rows``): the estimate, the costs, the rounding."""

from __future__ import annotations

import pytest
import torch
from conftest import make_data, train_briefly
from torch import nn
from torch.utils.data import DataLoader

from bayesq_lightning import BayesQConfig, quantize_model
from bayesq_lightning.posterior.base import KronLayerPosterior
from bayesq_lightning.quantizers import block_storage_bits, dequantize
from bayesq_lightning.quantizers.nonuniform import design_nonuniform
from bayesq_lightning.quantizers.uniform import design_uniform
from bayesq_lightning.result import BlockResult
from bayesq_lightning.rounding import feedback_round_blocks
from bayesq_lightning.row_sample import full_block_bits, sample_rows


def _spd(n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    return x @ x.T / n


def test_rows_drawn_in_proportion_to_their_terms_estimate_the_sum_exactly():
    y = torch.rand(40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows, weight = sample_rows(3 * y, 10, seed=1)  # sizes proportional to the terms
    assert len(rows) < 40 and float((weight * y[rows]).sum()) == pytest.approx(float(y.sum()))


def test_row_sample_estimate_is_unbiased():
    g = torch.Generator().manual_seed(2)
    y, size = torch.rand(30, generator=g, dtype=torch.float64), torch.rand(30, generator=g)
    estimates = []
    for seed in range(3000):
        rows, weight = sample_rows(size, 8, seed)
        estimates.append(float((weight * y[rows]).sum()))
    e = torch.tensor(estimates)
    assert abs(float(e.mean()) - float(y.sum())) < 4 * float(e.std()) / len(e) ** 0.5
    assert float(e.std()) > 0  # a real sample: estimates vary


def test_zero_sizes_draw_uniformly():
    rows, weight = sample_rows(torch.zeros(10), 4, seed=0)
    assert float(weight.sum()) > 0 and rows.max() < 10


@pytest.mark.parametrize("prior", [False, True])
def test_kron_row_terms_sum_to_the_block_loss_where_rows_do_not_interact(prior):
    g = torch.Generator().manual_seed(1)
    G, A = torch.diag(torch.rand(9, generator=g)), _spd(5, g).float()
    lp = KronLayerPosterior("fc", torch.zeros(9, 5), None, 0.3, A=A, G=G)
    rows, dW = (2, 8), torch.randn(6, 5, generator=g, dtype=torch.float64)
    row_terms = lp.row_terms(rows, prior)
    terms = row_terms.terms
    assert torch.equal(row_terms.scales, G.diagonal()[2:8].double())
    assert float(terms(dW, torch.arange(6)).sum()) == pytest.approx(
        lp.block_loss(rows, prior)(dW), rel=1e-5)
    idx = torch.tensor([1, 4])
    assert torch.allclose(terms(dW[idx], idx), terms(dW, torch.arange(6))[idx])


@pytest.mark.parametrize("layout", ["uniform", "uniform-groups", "codebook", "row-codebooks"])
def test_a_samples_cost_is_the_whole_blocks(layout):
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(2))
    idx = torch.tensor([0, 3, 4, 11, 20, 21, 39])

    def design(x: torch.Tensor) -> BlockResult:
        if layout.startswith("uniform"):
            gs = 10 if layout == "uniform-groups" else None
            grid = design_uniform(x, 3, group_size=gs)
            return BlockResult((0, len(x)), 3, "uniform", gs, grid.codes, grid.scale, grid.zero)
        grid = design_nonuniform(x, 3, per_row=layout == "row-codebooks")
        return BlockResult((0, len(x)), 3, "nonuniform", None, grid.codes,
                           codebook=grid.codebook)

    assert full_block_bits(design(w[idx]), 40) == block_storage_bits(design(w))


def test_feedback_rounds_a_row_sample_as_it_rounds_those_rows_of_the_block():
    """The premise: error feedback acts on each row on its own, so a sample's codes are the
    whole block's codes of those rows."""
    g = torch.Generator().manual_seed(4)
    w, H = torch.randn(50, 16, generator=g), _spd(16, g).float()
    idx = torch.tensor([0, 2, 7, 8, 19, 30, 31, 40, 49])
    grid = design_uniform(w, 2)
    whole, = feedback_round_blocks([BlockResult((0, 50), 2, "uniform", None, grid.codes,
                                                grid.scale, grid.zero)], w, H, 50)
    part, = feedback_round_blocks([BlockResult((0, 9), 2, "uniform", None, grid.codes[idx],
                                               grid.scale[idx], grid.zero[idx])], w[idx], H, 50)
    assert torch.equal(part.codes, whole.codes[idx])


@pytest.fixture(scope="module")
def wide_net() -> nn.Module:
    """A 300-unit hidden layer: more than 2 x score_rows rows at score_rows=32."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 4))
    return train_briefly(net, DataLoader(make_data(256), batch_size=32, shuffle=True))


@pytest.mark.parametrize("method", ["bayesq", "gptq"])
def test_sampled_blocks_store_their_chosen_candidate_rounded_on_every_row(wide_net, method):
    loader = DataLoader(make_data(128, seed=1), batch_size=32)
    cfg = dict(method=method, bits=3.0, calib_batches=4, n_data=256)
    sampled = quantize_model(wide_net, loader, BayesQConfig(score_rows=32, **cfg),
                             progress=False)
    whole = quantize_model(wide_net, loader, BayesQConfig(score_rows=None, **cfg),
                           progress=False)
    assert sampled.info["sampled_blocks"] == 1 and whole.info["sampled_blocks"] == 0
    # blocks whose exact comparison kept another grid than the sample's estimate preferred
    assert sampled.info["sample_overruled"] in (0, 1) and whole.info["sample_overruled"] == 0
    assert sampled.bits_per_weight <= 3.0
    hidden = sampled.layers[0].blocks[0]
    assert hidden.codes.shape == (300, 64)
    # the same width as the whole run here, and then the same grid and codes: the chosen
    # width's grids are compared exactly, on every row
    assert [b.bits for b in whole.layers[0].blocks] == [hidden.bits]
    assert torch.equal(whole.layers[0].blocks[0].scale, hidden.scale)
    assert torch.equal(whole.layers[0].blocks[0].codes, hidden.codes)
    if method == "bayesq":  # the reported loss is the exact score of what is stored
        lp = sampled.posterior.layers["1"]
        dW = dequantize(hidden, torch.float64) - lp.mean.double()
        assert sampled.layers[0].expected_loss == pytest.approx(lp.quad_form(dW, (0, 300)),
                                                                rel=1e-6)


def test_score_rows_leaves_monte_carlo_tables_whole(wide_net):
    loader = DataLoader(make_data(64, seed=1), batch_size=32)
    res = quantize_model(wide_net, loader, BayesQConfig(score_rows=32, tables="mc",
                                                        mc_samples=1, calib_batches=2,
                                                        n_data=256), progress=False)
    assert res.info["sampled_blocks"] == 0


@pytest.mark.parametrize("bad", [1, 0, 2.5, True, "64"])
def test_score_rows_must_be_a_row_count(bad):
    with pytest.raises(ValueError, match="score_rows"):
        BayesQConfig(score_rows=bad)
