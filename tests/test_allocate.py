"""Tests of the multiple-choice knapsack allocator."""

from __future__ import annotations

import itertools
import math
import random
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bayesq_lightning.allocate import (
    InfeasibleBudgetError,
    Option,
    _greedy,
    allocate,
    fill,
    greedy_gap_bound,
    lower_convex_hull,
)


def total(options, picks, attr):
    return sum(getattr(block[j], attr) for block, j in zip(options, picks, strict=True))


@st.composite
def problems(draw):
    """A random table (1-6 blocks, 1-4 options, costs 1..60 with a shared gcd) and a budget."""
    g = draw(st.sampled_from([1, 1, 2, 3, 8]))
    loss = st.floats(0, 100, allow_nan=False, allow_infinity=False, allow_subnormal=False)
    options = [
        [
            Option(cost=g * draw(st.integers(1, 60 // g)), loss=draw(loss), bits=b)
            for b in range(draw(st.integers(1, 4)))
        ]
        for _ in range(draw(st.integers(1, 6)))
    ]
    lo = sum(min(o.cost for o in bl) for bl in options)
    hi = sum(max(o.cost for o in bl) for bl in options)
    return options, draw(st.integers(lo, hi + 5))


def brute_force(options, budget):
    feasible = (
        p
        for p in itertools.product(*(range(len(bl)) for bl in options))
        if total(options, p, "cost") <= budget
    )
    return min(total(options, p, "loss") for p in feasible)


@settings(max_examples=300, deadline=None)
@given(problems())
def test_dp_is_exact_and_greedy_within_bound(problem):
    options, budget = problem
    dp = allocate(options, budget, solver="dp")
    greedy = allocate(options, budget, solver="greedy")
    assert [len(p) for p in (dp, greedy)] == [len(options)] * 2
    assert total(options, dp, "cost") <= budget
    assert total(options, greedy, "cost") <= budget
    best = brute_force(options, budget)
    assert math.isclose(total(options, dp, "loss"), best, rel_tol=1e-12, abs_tol=1e-9)
    bound = greedy_gap_bound(options)
    assert best <= total(options, greedy, "loss") <= best + bound + 1e-9
    if budget >= sum(max(o.cost for o in bl) for bl in options):  # everything fits: greedy is exact
        assert math.isclose(total(options, greedy, "loss"), best, abs_tol=1e-9)


@settings(max_examples=300, deadline=None)
@given(problems())
def test_fill_spends_what_fits_and_never_exceeds_the_budget(problem):
    options, budget = problem
    picks = allocate(options, budget, solver="greedy")
    spare = budget - total(options, picks, "cost")
    assert spare >= 0
    for block, j in zip(options, picks, strict=True):  # no single upgrade still fits
        assert not any(o.loss < block[j].loss and o.cost - block[j].cost <= spare for o in block)
        assert not any(o.loss == block[j].loss and o.bits > block[j].bits
                       and 0 < o.cost - block[j].cost <= spare for o in block)
    hull_only = _greedy(options, budget)
    assert total(options, picks, "loss") <= total(options, hull_only, "loss")
    assert fill(options, picks, budget) == picks  # nothing left to do


@pytest.mark.parametrize("solver", ["greedy", "dp"])
def test_fill_spends_the_budget_where_the_table_cannot_tell_widths_apart(solver):
    # Monte-Carlo tables clamp to zero: every width of these blocks has loss 0, and block 2's
    # upgrade lowers the loss; the rest of the budget goes to equal-loss upgrades, the
    # narrowest widths first
    flat = [Option(2, 0.0, 2), Option(3, 0.0, 3), Option(4, 0.0, 4)]
    options = [flat, flat, [Option(2, 5.0, 2), Option(4, 1.0, 4)]]
    assert allocate(options, 7, solver=solver) == [1, 0, 0]  # the loss's upgrade does not fit
    assert allocate(options, 8, solver=solver) == [0, 0, 1]  # the loss first
    assert allocate(options, 9, solver=solver) == [1, 0, 1]
    assert allocate(options, 10, solver=solver) == [1, 1, 1]  # 3 bits everywhere before 4
    assert allocate(options, 11, solver=solver) == [2, 1, 1]
    assert allocate(options, 13, solver=solver) == [2, 2, 1]
    # never narrower: an equal-loss option with fewer bits that costs more (a codebook's
    # metadata) is not a widening
    block = [Option(50, 3.0, 2), Option(104, 0.0, 8), Option(292, 0.0, 4, "nonuniform")]
    assert allocate([block], 300, solver=solver) == [1]


def test_fill_takes_an_option_off_the_hull_that_the_greedy_skips():
    # block 0's middle option lies above the chord, so the greedy (hull only) stops at the
    # cheapest; with 3 spare bits the middle option fits and lowers the loss
    options = [[Option(2, 10.0, 2), Option(5, 9.0, 3), Option(9, 0.0, 4)]]
    assert allocate(options, 5) == [1]
    assert allocate(options, 8) == [1]
    assert allocate(options, 9) == [2]


@settings(max_examples=200, deadline=None)
@given(problems())
def test_hull_is_lower_left_convex(problem):
    options = problem[0][0]
    hull = lower_convex_hull(options)
    pts = [(options[i].cost, options[i].loss) for i in hull]
    assert pts[0] == min((o.cost, o.loss) for o in options)
    assert all(c0 < c1 and d0 > d1 for (c0, d0), (c1, d1) in pairwise(pts))
    rates = [(d0 - d1) / (c1 - c0) for (c0, d0), (c1, d1) in pairwise(pts)]
    assert all(r0 > r1 - 1e-12 for r0, r1 in pairwise(rates))  # division rounds
    for o in options:  # every option is on or above the hull (beyond its end: no better loss)
        seg = [(a, b) for a, b in pairwise(pts) if a[0] <= o.cost <= b[0]]
        if seg:
            (c0, d0), (c1, d1) = seg[0]
            assert o.loss >= d0 + (d1 - d0) * (o.cost - c0) / (c1 - c0) - 1e-9
        else:
            assert o.loss >= pts[-1][1]


def test_hull_hand_example():
    a, b, c, d = (10, 10.0), (20, 6.0), (30, 5.0), (40, 1.0)  # c lies above the chord b -> d
    dominated, tie, collinear = (25, 7.0), (10, 12.0), (15, 8.0)
    pts = [c, dominated, d, tie, b, collinear, a]
    options = [Option(cost=k, loss=v, bits=i) for i, (k, v) in enumerate(pts)]
    assert lower_convex_hull(options) == [pts.index(a), pts.index(b), pts.index(d)]
    assert greedy_gap_bound([options]) == 5.0  # b -> d
    assert lower_convex_hull(options[:1]) == [0]


def test_greedy_freezes_a_block_that_does_not_fit_and_breaks_ties_by_block():
    big = [Option(10, 100.0, 2), Option(100, 0.0, 8)]  # best rate, but does not fit
    small = [Option(10, 10.0, 2), Option(15, 5.0, 4)]
    assert allocate([big, small], budget=30) == [0, 1]
    assert allocate([small, small], budget=25) == [1, 0]
    assert allocate([small, small], budget=25, solver="dp") in ([1, 0], [0, 1])


def test_greedy_ranks_by_loss_saved_per_bit_not_by_loss_saved():
    cheap = [Option(10, 10.0, 2), Option(20, 0.0, 4)]  # saves 10 for 10 bits
    dear = [Option(10, 20.0, 2), Option(100, 8.0, 8)]  # saves 12 for 90 bits
    assert allocate([cheap, dear, cheap], budget=120) == [1, 0, 1]  # dear alone would fit


def test_exact_budget_is_feasible_and_infeasible_names_the_minimum():
    options = [[Option(33, 1.0, 2), Option(50, 0.5, 3)], [Option(32, 1.0, 2)]]
    assert allocate(options, 65) == [0, 0]
    with pytest.raises(InfeasibleBudgetError) as err:
        allocate(options, 64, solver="dp")
    assert err.value.min_cost == 65 and "65 bits" in str(err.value)
    assert isinstance(err.value, ValueError)
    with pytest.raises(InfeasibleBudgetError, match=r"1\.5 bits/weight.*needs 2\.0313 bits/weight"):
        allocate(options, 48, n_weights=32)  # 65 / 32 = 2.03125, rounded up


def test_bad_options_raise():
    for kwargs in (
        {"cost": 0, "loss": 1.0},
        {"cost": 1.5, "loss": 1.0},
        {"cost": True, "loss": 1.0},
        {"cost": 4, "loss": -1.0},
        {"cost": 4, "loss": math.nan},
        {"cost": 4, "loss": math.inf},
    ):
        with pytest.raises(ValueError, match="Option (cost|loss)"):
            Option(bits=2, **kwargs)


@pytest.mark.parametrize(
    "options, budget, kwargs, match",
    [
        ([], 10, {}, "options is empty"),
        ([[Option(4, 1.0, 2)], []], 10, {}, "block 1 has no options"),
        ([[(4, 1.0)]], 10, {}, "expected Option"),
        ([[Option(4, 1.0, 2)]], 0, {}, "positive finite"),
        ([[Option(4, 1.0, 2)]], -3, {}, "positive finite"),
        ([[Option(4, 1.0, 2)]], math.inf, {}, "positive finite"),
        ([[Option(4, 1.0, 2)]], math.nan, {}, "positive finite"),
        ([[Option(4, 1.0, 2)]], "10", {}, "positive finite"),
        ([[Option(4, 1.0, 2)]], 10, {"solver": "ilp"}, "'greedy', 'dp'"),
        ([[Option(4, 1.0, 2)]], 10, {"n_weights": 0}, "n_weights"),
        ([[Option(1, 1.0, 2), Option(10**9, 0.0, 8)]] * 2, 10**10, {"solver": "dp"}, "greedy"),
    ],
)
def test_bad_inputs_raise(options, budget, kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        allocate(options, budget, **kwargs)
    assert not isinstance(err.value, InfeasibleBudgetError)


def test_large_table_greedy_is_near_optimal():
    rng = random.Random(0)
    options, n_weights = [], 0
    for _ in range(200):
        n, rows, var = rng.randint(64, 4096), rng.randint(4, 64), rng.lognormvariate(0, 2)
        n_weights += n
        options.append(
            [  # storage_bits-like: packed codes + fp16 scale and zero per row
                Option(8 * -(-n * b // 8) + 32 * rows, n * var * 4.0**-b * rng.uniform(0.8, 1.2), b)
                for b in (2, 3, 4, 8)
            ]
        )
    budget = int(3.5 * n_weights)
    greedy = allocate(options, budget, n_weights=n_weights)
    dp = allocate(options, budget, solver="dp")
    assert total(options, greedy, "cost") <= budget and total(options, dp, "cost") <= budget
    lg, ld = total(options, greedy, "loss"), total(options, dp, "loss")
    assert ld <= lg + 1e-9 and lg <= ld + greedy_gap_bound(options) + 1e-9
    assert len({options[b][j].bits for b, j in enumerate(greedy)}) > 1  # a real mix of widths
