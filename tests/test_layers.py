"""Layer selection, finiteness and per-layer bit pins."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bayesq_lightning import BayesQConfig
from bayesq_lightning.allocate import Option, allocate
from bayesq_lightning.block_plan import plan_blocks
from bayesq_lightning.layers import (
    check_finite,
    check_pin_patterns,
    pinned_bits,
    quantizable_layers,
)


def test_model_without_quantizable_layers_is_refused():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.ReLU())
    with pytest.raises(ValueError, match="no quantizable layer"):
        quantizable_layers(model)


def test_include_exclude_patterns(trained):
    assert [n for n, _ in quantizable_layers(trained, include=["fc*"])] == ["fc1", "fc2"]
    assert [n for n, _ in quantizable_layers(trained, exclude=["fc2"])] == ["conv", "fc1"]


def test_non_finite_weights_are_named():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight[1, 2] = float("inf")
    with pytest.raises(ValueError, match="'head' has 1 NaN/inf"):
        check_finite([("head", layer)])


@pytest.mark.parametrize(("name", "min_bits", "max_bits", "allowed", "expected"), [
    ("fc1", None, None, (2, 3, 4, 8), (2, 3, 4, 8)),
    ("fc1", {"fc*": 3}, None, (2, 3, 4, 8), (3, 4, 8)),
    ("fc1", None, {"fc1": 4}, (2, 3, 4, 8), (2, 3, 4)),
    ("fc1", {"*": 3, "fc*": 4}, {"fc1": 8}, (2, 3, 4, 8), (4, 8)),  # the tightest pin wins
    ("conv", {"fc*": 8}, None, (2, 4), (2, 4)),  # a pin for other layers changes nothing
    ("fc2", {"fc2": 3}, {"fc2": 3}, (2, 3, 4), (3,)),
])
def test_pinned_bits_cases(name, min_bits, max_bits, allowed, expected):
    cfg = BayesQConfig(allowed_bits=allowed, min_bits=min_bits, max_bits=max_bits)
    assert pinned_bits(name, cfg) == expected


def test_pins_the_bit_set_cannot_meet_and_patterns_matching_nothing():
    with pytest.raises(ValueError, match="'fc1'.*no width within its pins"):
        pinned_bits("fc1", BayesQConfig(allowed_bits=(2, 3), min_bits={"fc*": 4}))
    with pytest.raises(ValueError, match="'fc9' matches no quantized layer"):
        check_pin_patterns(["fc1", "fc2"], BayesQConfig(max_bits={"fc9": 4}))


_WIDTHS = (2, 3, 4, 8)


_WIDTHS = (2, 3, 4, 8)


@settings(max_examples=60, deadline=None)
@given(
    allowed=st.sets(st.sampled_from(_WIDTHS), min_size=1),
    pins=st.dictionaries(st.sampled_from(["fc1", "fc*", "conv", "*"]),
                         st.tuples(st.sampled_from(_WIDTHS), st.sampled_from(_WIDTHS)),
                         max_size=2),
    pack=st.sampled_from([1, 2, 4]),
    mult=st.integers(1, 3),
    slack=st.floats(0.0, 1.0),
    solver=st.sampled_from(["greedy", "dp"]),
)
def test_every_allocation_honours_bit_set_pins_and_packing(allowed, pins, pack, mult, slack,
                                                           solver):
    """Random constraints on TinyNet's layers, random tables: the allocation honours them all."""
    from conftest import TinyNet

    model = TinyNet()
    named = [(n, m) for n, m in model.named_modules() if n in ("conv", "fc1", "fc2")]
    cfg = BayesQConfig(allowed_bits=tuple(allowed), block_rows=pack * mult, pack_multiple=pack,
                       method="rtn", min_bits={k: v[0] for k, v in pins.items()},
                       max_bits={k: v[1] for k, v in pins.items()})
    try:
        widths = {n: pinned_bits(n, cfg) for n, _ in named}
    except ValueError as err:  # the bit set cannot meet some layer's pins: said so, by name
        assert "no width within its pins" in str(err)
        return
    blocks = plan_blocks(named, widths, cfg, None, None)
    g = torch.Generator().manual_seed(len(blocks))
    options = [[Option(8 * (-(-b.w.numel() * k // 8)) + 16 * 2 * b.w.shape[0],
                       float(torch.rand(1, generator=g)) / k, k) for k in b.bits]
               for b in blocks]
    cheapest = sum(min(o.cost for o in opts) for opts in options)
    richest = sum(max(o.cost for o in opts) for opts in options)
    budget = int(cheapest + slack * (richest - cheapest))
    choice = allocate(options, budget, solver=solver)
    assert sum(opts[j].cost for opts, j in zip(options, choice, strict=True)) <= budget
    for block, opts, j in zip(blocks, options, choice, strict=True):
        # pinned_bits itself is checked against hand-written cases above
        assert opts[j].bits in allowed and opts[j].bits in widths[block.layer]
        r0, r1 = block.rows  # packing: every block starts on a pack boundary and spans whole
        assert r0 % pack == 0  # multiples of it, except a layer's remainder at the end
        assert (r1 - r0) % pack == 0 or r1 == block.layer_rows


