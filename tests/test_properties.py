"""Property tests (hypothesis): packing round trip, allocator invariants, quantizer invariants."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bayesq_lightning.allocate import InfeasibleBudgetError, Option, allocate
from bayesq_lightning.artifact.packing import pack_codes, packed_nbytes, unpack_codes
from bayesq_lightning.quantizers import expand_groups
from bayesq_lightning.quantizers.uniform import design_uniform

BITS = st.sampled_from([2, 3, 4, 8])
FAST = settings(max_examples=60, deadline=None)


@FAST
@given(bits=BITS, n=st.integers(1, 200), seed=st.integers(0, 2**31 - 1))
def test_packing_round_trip(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
    buf = pack_codes(codes, bits)
    assert buf.dtype == torch.uint8 and buf.numel() == packed_nbytes(n, bits)
    assert packed_nbytes(n, bits) == math.ceil(n * bits / 8)
    assert torch.equal(unpack_codes(buf, bits, n), codes)


@st.composite
def knapsacks(draw):
    """Blocks of 1-4 options with positive integer costs and non-negative losses."""
    blocks = []
    for _ in range(draw(st.integers(1, 5))):
        k = draw(st.integers(1, 4))
        costs = draw(st.lists(st.integers(1, 40), min_size=k, max_size=k))
        losses = draw(st.lists(st.floats(0, 100, allow_nan=False), min_size=k, max_size=k))
        blocks.append([Option(c, x, bits=i) for i, (c, x) in enumerate(
            zip(costs, losses, strict=True))])
    return blocks


@FAST
@given(options=knapsacks(), budget=st.integers(1, 200), solver=st.sampled_from(["greedy", "dp"]))
def test_allocation_never_exceeds_the_budget(options, budget, solver):
    cheapest = sum(min(o.cost for o in b) for b in options)
    if budget < cheapest:
        try:
            allocate(options, budget, solver)
        except InfeasibleBudgetError as e:
            assert e.min_cost == cheapest
            return
        raise AssertionError("an infeasible budget was accepted")
    choice = allocate(options, budget, solver)
    assert len(choice) == len(options)
    assert sum(b[j].cost for b, j in zip(options, choice, strict=True)) <= budget


@FAST
@given(options=knapsacks(), budget=st.integers(1, 150), extra=st.integers(1, 60))
def test_exact_solver_loss_never_rises_with_the_budget(options, budget, extra):
    cheapest = sum(min(o.cost for o in b) for b in options)
    budget = max(budget, cheapest)

    def loss(b: int) -> float:
        return sum(opts[j].loss for opts, j in zip(options, allocate(options, b, "dp"),
                                                   strict=True))

    assert loss(budget + extra) <= loss(budget) + 1e-9
    brute = min(  # the DP is exact: compare with enumeration on these small instances
        (sum(o.loss for o in combo) for combo in _combos(options)
         if sum(o.cost for o in combo) <= budget), default=math.inf)
    assert loss(budget) <= brute + 1e-9


def _combos(options):
    if not options:
        yield ()
        return
    for o in options[0]:
        for rest in _combos(options[1:]):
            yield (o, *rest)


@FAST
@given(bits=BITS, rows=st.integers(1, 4), cols=st.integers(1, 24),
       scale=st.floats(1e-4, 10.0), seed=st.integers(0, 2**31 - 1),
       group=st.sampled_from([None, 4, 7]), weighted=st.booleans())
def test_uniform_grid_invariants(bits, rows, cols, scale, seed, group, weighted):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(rows, cols, generator=g) * scale
    # weighted: the range search may clip; unweighted: the min-max grid
    precision = torch.rand(rows, cols, generator=g) + 0.1 if weighted else None
    grid = design_uniform(mu, bits, precision=precision, group_size=group)
    codes = grid.codes
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    for r in range(rows):  # at most 2**bits distinct levels per (row, group)
        assert codes[r].unique().numel() <= 2**bits
    s = expand_groups(grid.scale.float(), cols, group)
    z = expand_groups(grid.zero.float(), cols, group)
    deq = (codes.float() - z) * s
    lo, hi = -z * s, (2**bits - 1 - z) * s  # the clip range of each weight's grid
    inside = (mu >= lo) & (mu <= hi)
    err = (deq - mu).abs()
    # round to nearest inside the clip range: at most half a step (fp32 slack)
    assert bool((err[inside] <= 0.5 * s[inside] * (1 + 1e-4) + 1e-7).all())
