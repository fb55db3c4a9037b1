"""Tests of the task-aware checks (``tables="checked"``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayesq_lightning import BayesQConfig, quantize_model
from bayesq_lightning.allocate import Option
from bayesq_lightning.block_plan import BlockPlan, allocate_plans
from bayesq_lightning.checks import check_plans
from bayesq_lightning.methods import BlockContext
from bayesq_lightning.result import BlockResult


def _grid_candidate(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> BlockResult:
    """A 2-bit per-row grid over ``[lo, hi]`` with nearest codes."""
    scale = ((hi - lo) / 3).half()
    zero = (-lo / scale.float()).half()
    codes = (w / scale.float()[:, None] + zero.float()[:, None]).round().clamp(0, 3)
    return BlockResult((0, w.shape[0]), 2, "uniform", None, codes.to(torch.uint8),
                       scale[:, None], zero[:, None])


def test_the_check_overrules_a_closed_form_that_prefers_the_worse_grid():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    with torch.no_grad():  # one large weight carries the decision; clipping it loses it
        layer.weight.mul_(0.1)
        layer.weight[:, 0] = torch.tensor([4.0, -4.0, 4.0, -4.0])
    model = nn.Sequential(layer)
    x = torch.randn(64, 8)
    batches = [(x, torch.zeros(64, dtype=torch.long))]
    w = layer.weight.detach()
    minmax = _grid_candidate(w, w.amin(1).clamp(max=0), w.amax(1).clamp(min=0))
    clipped = _grid_candidate(w, torch.full((4,), -0.2), torch.full((4,), 0.2))
    plan = BlockPlan(BlockContext("0", w, (0, 4)), (2,))
    plan.candidates = [minmax, clipped]
    cost = 4 * 8 * 2 + 2 * 4 * 16
    # the closed form prefers the clipped grid (a small quadratic form, say)
    plan.options = [Option(cost, 1.0, 2, "uniform"), Option(cost, 0.1, 2, "uniform")]
    cfg = BayesQConfig(bits=16.0, allowed_bits=(2,))
    allocate_plans([plan], 10 ** 6, cfg, w.numel())
    assert plan.choice == 1
    record = check_plans(model, batches, [plan], n_data=64, top_k=1, max_inputs=None, budget=None,
                         allocate=lambda ps: allocate_plans(ps, 10 ** 6, cfg, w.numel()))
    assert plan.choice == 0  # the measured KL says clipping the large weight costs more
    assert plan.options[1].loss > plan.options[0].loss
    assert record["checked_candidates"] == 2


def test_checked_tables_end_to_end(tiny_net, loader):
    cfg = BayesQConfig(bits=3.0, tables="checked", check_inputs=32, check_top_k=2,
                       check_budget=None, calib_batches=2, allowed_bits=(2, 3, 4))
    res = quantize_model(tiny_net.eval(), loader, cfg, progress=False)
    assert res.bits_per_weight <= 3.0
    # every block's two grids at its chosen width, then the boundary's candidates
    assert res.info["checked_candidates"] >= 2 * len(res.layers)
    assert res.info["check_forward_passes"] >= res.info["checked_candidates"]


@pytest.mark.parametrize("share", [0.0, 0.25])
def test_the_check_budget_caps_the_inputs_run(tiny_net, loader, share):
    cfg = BayesQConfig(bits=3.0, tables="checked", check_inputs=8, check_budget=share,
                       calib_batches=2, allowed_bits=(2, 3, 4))
    if share == 0.0:  # a budget that allows nothing says so
        with pytest.warns(UserWarning, match="allows no measurement"):
            res = quantize_model(tiny_net.eval(), loader, cfg, progress=False)
    else:
        res = quantize_model(tiny_net.eval(), loader, cfg, progress=False)
    n_calib = 2 * loader.batch_size  # calib_batches=2
    assert res.info["checked_candidates"] * 8 <= share * n_calib
    if share == 0.0:  # nothing measured: the closed form's result
        plain = quantize_model(tiny_net.eval(), loader, BayesQConfig(
            bits=3.0, calib_batches=2, allowed_bits=(2, 3, 4), tables="closed_form"),
            progress=False)
        for a, b in zip(res.layers, plain.layers, strict=True):
            for x, y in zip(a.blocks, b.blocks, strict=True):
                assert torch.equal(x.codes, y.codes)
    else:
        assert res.info["checked_candidates"] > 0
