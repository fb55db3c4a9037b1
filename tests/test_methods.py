"""The method table: what each method needs, and how it designs and scores a block."""

from __future__ import annotations

import pytest
import torch

from bayesq_lightning import BayesQConfig, quantize_model
from bayesq_lightning.methods import METHODS_TABLE, BlockContext
from bayesq_lightning.posterior import LayerPosterior


@pytest.mark.parametrize(("method", "structure", "calibration", "hessians", "mc"), [
    ("bayesq", "kron", True, False, True),
    ("hawq", "diag", True, False, True),
    ("gptq", None, True, True, False),
    ("mse", None, False, False, False),
    ("rtn", None, False, False, False),
])
def test_what_each_method_needs(method, structure, calibration, hessians, mc):
    record = METHODS_TABLE[method]
    assert record.posterior_structure(BayesQConfig(structure="kron")) == structure
    assert record.needs_calibration is calibration
    assert record.input_hessians is hessians
    assert record.supports_mc_tables is mc
    expected = "expected" if method == "bayesq" else "deployed"
    assert record.range_objectives(BayesQConfig(range_objective="expected"), False) == (
        expected,)
    # "auto": both the unclipped and the clipped grid where error feedback rounds (the score
    # picks), the deployed error elsewhere
    auto = BayesQConfig()
    if method == "bayesq":
        assert record.range_objectives(auto, True) == ("minmax", "deployed")
    assert record.range_objectives(auto, False) == ("deployed",)


def test_block_scores_by_method():
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    lam = torch.rand(4, 3, generator=torch.Generator().manual_seed(1)) + 0.5
    lp = LayerPosterior("fc", w, lam, prior_precision=0.5)
    H = torch.eye(3) * 2.0
    dW = torch.full((2, 3), 0.1, dtype=torch.float64)
    ctx = BlockContext("fc", w, (2, 4), lp, H)
    bayesq = METHODS_TABLE["bayesq"].block(ctx)
    # the default score is the likelihood curvature (precision minus prior), no prior term
    assert bayesq.loss(dW) == pytest.approx(float(((lam[2:4] - 0.5).double() * dW * dW).sum()))
    torch.testing.assert_close(bayesq.weight, lam[2:4] - 0.5)
    # the grid design reads the precision only under range_objective="expected"; otherwise the
    # design weights stand in (K-FAC's delta is not solved for it)
    torch.testing.assert_close(bayesq.precision, bayesq.weight)
    expected = METHODS_TABLE["bayesq"].block(BlockContext("fc", w, (2, 4), lp, H,
                                                          design_precision=True))
    torch.testing.assert_close(expected.precision, lam[2:4])  # the posterior's spread
    old = METHODS_TABLE["bayesq"].block(BlockContext("fc", w, (2, 4), lp, H,
                                                     with_prior=True))
    assert old.loss(dW) == pytest.approx(float((lam[2:4].double() * dW * dW).sum()))
    torch.testing.assert_close(old.weight, lam[2:4])
    assert METHODS_TABLE["rtn"].block(ctx).loss(dW) == pytest.approx(0.06)
    assert METHODS_TABLE["mse"].block(ctx).precision.eq(1).all()
    hawq = METHODS_TABLE["hawq"].block(ctx)
    assert hawq.precision is None  # min-max grid
    assert hawq.loss(dW) == pytest.approx(float((lam - 0.5).mean()) * 0.06)
    gptq = METHODS_TABLE["gptq"].block(ctx)
    assert gptq.loss(dW) == pytest.approx(2.0 * 0.06) and gptq.H is not None


def test_mse_reads_no_calibration_data(trained):
    # mse designs with unit weights: a loader is neither needed nor read (even a broken one)
    a = quantize_model(trained, None, BayesQConfig(method="mse"), progress=False)
    b = quantize_model(trained, ["not a batch"], BayesQConfig(method="mse"), progress=False)
    assert [x.blocks[0].codes.tolist() for x in a.layers] == [
        x.blocks[0].codes.tolist() for x in b.layers]
