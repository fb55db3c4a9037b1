"""Bit allocation: a multiple-choice knapsack over the tables ``D[block][option]``, ``C[...]``.

Every block ``b`` has options ``j`` with exact storage cost ``C_bj`` (integer bits, metadata
included) and expected loss ``D_bj``. The allocator picks one option ``x_b`` per block to solve

    min_x  sum_b D[b, x_b]   subject to   sum_b C[b, x_b] <= B.

``solver="greedy"`` starts every block at its cheapest option and repeatedly takes the upgrade
with the largest loss decrease per bit, ``(D_before - D_after) / (C_after - C_before)``, along
each block's lower convex hull of ``(C, D)``; the hulls make that rate decrease within a block,
so up to its first upgrade that does not fit the greedy follows the LP relaxation's optimum,
which is below the integer optimum OPT. Hence (classical LP argument)
``loss(greedy) <= OPT + max_b max_k (D_{b,k} - D_{b,k+1})``, see :func:`greedy_gap_bound`.
The hulls skip options above a chord, so the greedy can stop with bits to spare.
``solver="dp"`` is exact: dynamic programming over costs divided by their gcd.
After either solver, :func:`fill` spends what is left: first on the options (hull or not) that
lower the loss most and still fit, then on wider options at an equal loss (a table that cannot
tell widths apart), until neither fits.
"""

from __future__ import annotations

import heapq
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import reduce
from itertools import pairwise

import numpy as np

from .choices import SOLVERS

MAX_DP_CELLS = 200_000_000  # blocks x capacity cells of the exact DP (one byte each for argmin)


@dataclass(frozen=True)
class Option:
    """One choice for a block: storage ``cost`` (bits, > 0), expected ``loss`` (>= 0)."""

    cost: int
    loss: float
    bits: int
    tag: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.cost, bool) or not isinstance(self.cost, numbers.Integral):
            raise ValueError(f"Option cost must be an integer number of bits, got {self.cost!r}")
        if self.cost <= 0:
            raise ValueError(f"Option cost must be positive (bits stored), got {self.cost}")
        if not isinstance(self.loss, numbers.Real) or not math.isfinite(self.loss):
            raise ValueError(f"Option loss must be a finite number, got {self.loss!r}")
        if self.loss < 0:
            raise ValueError(f"Option loss must be >= 0 (an expected loss), got {self.loss}")
        object.__setattr__(self, "cost", int(self.cost))
        object.__setattr__(self, "loss", float(self.loss))


class InfeasibleBudgetError(ValueError):
    """The budget is below the cheapest allocation; ``min_cost`` is the smallest feasible one."""

    def __init__(self, message: str, min_cost: int) -> None:
        super().__init__(message)
        self.min_cost = min_cost


def lower_convex_hull(options: Sequence[Option]) -> list[int]:
    """Indices of the options on the lower-left convex hull of the points ``(cost, loss)``.

    The hull starts at the cheapest option (lowest loss among cost ties); along it cost
    increases, loss strictly decreases and the rate ``-dD/dC`` strictly decreases. Options that
    are dominated (no cheaper in loss than a cheaper-or-equal option) or lie on or above a chord
    of the hull are dropped: no optimal LP solution needs them.
    """
    hull: list[int] = []
    for i in sorted(range(len(options)), key=lambda i: (options[i].cost, options[i].loss, i)):
        c, d = options[i].cost, options[i].loss
        if hull and d >= options[hull[-1]].loss:  # dominated: hull[-1] is cheaper and better
            continue
        while len(hull) >= 2:  # drop hull[-1] if on or above the chord hull[-2] -> i
            a, m = options[hull[-2]], options[hull[-1]]
            if (m.loss - a.loss) * (c - a.cost) >= (d - a.loss) * (m.cost - a.cost):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def greedy_gap_bound(options: Sequence[Sequence[Option]]) -> float:
    """Largest single hull-upgrade loss decrease ``max_b max_k D_{b,h_k} - D_{b,h_{k+1}}``.

    The greedy's total loss is at most the exact optimum plus this number.
    """
    gap = 0.0
    for block in options:
        hull = lower_convex_hull(block)
        for lo, hi in pairwise(hull):
            gap = max(gap, block[lo].loss - block[hi].loss)
    return gap


def allocate(
    options: Sequence[Sequence[Option]],
    budget: int,
    solver: str = "greedy",
    n_weights: int | None = None,
) -> list[int]:
    """Choose one option per block with total cost ``<= budget`` and minimal total loss.

    Parameters
    ----------
    options : sequence of sequences of Option
        ``options[b]`` are the choices for block ``b``.
    budget : int
        Total storage bits allowed, metadata included.
    solver : {"greedy", "dp"}
        ``"greedy"``: hull greedy, loss within :func:`greedy_gap_bound` of optimal, O(K log K)
        for K hull points. ``"dp"``: exact, O(options x budget / gcd(costs)).
    n_weights : int, optional
        Quantized weights the budget covers; only used to state errors in bits/weight.

    Returns
    -------
    list of int
        For each block, the index into ``options[b]`` of the chosen option.

    Raises
    ------
    InfeasibleBudgetError
        If ``sum_b min_j C_bj > budget``; its ``min_cost`` is that smallest feasible budget.
    ValueError
        On malformed options, budget, solver or ``n_weights``.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not one of {SOLVERS}")
    if len(options) == 0:
        raise ValueError("options is empty: there must be at least one block to allocate")
    for b, block in enumerate(options):
        if len(block) == 0:
            raise ValueError(f"block {b} has no options: give every block at least one choice")
        for o in block:
            if not isinstance(o, Option):
                raise ValueError(f"block {b}: expected Option instances, got {type(o).__name__}")
    ok = isinstance(budget, numbers.Real) and not isinstance(budget, bool)
    if not (ok and math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a positive finite number of bits, got {budget!r}")
    if n_weights is not None and (
        isinstance(n_weights, bool) or not isinstance(n_weights, numbers.Integral) or n_weights <= 0
    ):
        raise ValueError(f"n_weights must be a positive integer, got {n_weights!r}")

    min_cost = sum(min(o.cost for o in block) for block in options)
    if min_cost > budget:
        if n_weights is None:
            msg = (
                f"budget {budget} bits is infeasible: the cheapest allocation needs {min_cost} "
                f"bits (metadata included); raise the budget to at least {min_cost} bits or "
                "allow fewer bits"
            )
        else:
            need = math.ceil(Fraction(min_cost * 10_000, int(n_weights))) / 10_000
            msg = (
                f"budget {round(budget / n_weights, 4):g} bits/weight is infeasible: the cheapest "
                f"allocation needs {need:.4f} bits/weight ({min_cost} bits, metadata included); "
                f"raise `bits` to at least {need:.4f} or allow fewer bits"
            )
        raise InfeasibleBudgetError(msg, min_cost)
    return fill(options, _dp(options, budget) if solver == "dp" else _greedy(options, budget),
                budget)


def _greedy(options: Sequence[Sequence[Option]], budget: float) -> list[int]:
    hulls = [lower_convex_hull(block) for block in options]
    pos = [0] * len(options)  # position of each block on its hull
    spent = sum(block[h[0]].cost for block, h in zip(options, hulls, strict=True))
    heap: list[tuple[float, int]] = []

    def push(b: int) -> None:  # queue block b's next upgrade, keyed by -(loss saved per bit)
        h, k = hulls[b], pos[b]
        if k + 1 < len(h):
            lo, hi = options[b][h[k]], options[b][h[k + 1]]
            heapq.heappush(heap, (-(lo.loss - hi.loss) / (hi.cost - lo.cost), b))

    for b in range(len(options)):
        push(b)
    while heap:
        _, b = heapq.heappop(heap)  # ties: lower block index first
        h, k = hulls[b], pos[b]
        step = options[b][h[k + 1]].cost - options[b][h[k]].cost
        if spent + step > budget:
            continue  # does not fit: freeze block b, keep upgrading the others
        spent += step
        pos[b] = k + 1
        push(b)
    return [h[k] for h, k in zip(hulls, pos, strict=True)]


def fill(options: Sequence[Sequence[Option]], picks: Sequence[int], budget: float
         ) -> list[int]:
    """Spend the bits ``picks`` leaves under ``budget``: repeatedly switch the one block whose
    option change lowers the total loss most and whose extra cost still fits, until none does;
    then widen blocks at an equal loss, the narrowest block first, until no widening fits.

    Every step keeps the cost within the budget and never raises the loss. The second phase
    matters where a table cannot tell widths apart (Monte-Carlo losses clamped at zero, a
    constant block): a wider code at an equal modelled loss is never worse in fact. On return
    no single block's option with a lower loss, or with an equal loss and more bits, fits the
    remaining bits.
    """
    width = max(map(len, options))
    cost = np.full((len(options), width), np.inf)
    loss = np.full((len(options), width), np.inf)
    bits = np.zeros((len(options), width))
    for b, block in enumerate(options):
        cost[b, :len(block)] = [o.cost for o in block]
        loss[b, :len(block)] = [o.loss for o in block]
        bits[b, :len(block)] = [o.bits for o in block]
    picks = list(picks)
    rows = np.arange(len(options))
    while True:
        now_cost, now_loss = cost[rows, picks], loss[rows, picks]
        extra = cost - now_cost[:, None]
        gain = now_loss[:, None] - loss
        fits = extra <= budget - now_cost.sum()
        better = np.where(fits & (gain > 0), gain, -np.inf)
        now_bits = bits[rows, picks]
        wider = fits & (gain == 0) & (extra > 0) & (bits > now_bits[:, None])
        if np.isfinite(better.max()):
            b, j = np.unravel_index(np.argmax(better), gain.shape)
        elif wider.any():  # the narrowest block, its next width, the cheapest, the lowest index
            bs, js = np.nonzero(wider)
            k = np.lexsort((bs, extra[wider], bits[wider], now_bits[bs]))[0]
            b, j = bs[k], js[k]
        else:
            return picks
        picks[b] = int(j)


def _dp(options: Sequence[Sequence[Option]], budget: float) -> list[int]:
    # Costs are offset by each block's cheapest option and divided by g = gcd(all costs), which
    # keeps the DP exact: every total is a multiple of g, so sum C <= B iff sum C/g <= B // g.
    g = reduce(math.gcd, (o.cost for block in options for o in block))
    base = [min(o.cost for o in block) for block in options]
    spare = (math.floor(budget) - sum(base)) // g
    cap = min(
        spare, sum(max(o.cost for o in bl) - m for bl, m in zip(options, base, strict=True)) // g
    )
    if (cap + 1) * len(options) > MAX_DP_CELLS:
        raise ValueError(
            f"solver='dp' needs {len(options)} blocks x {cap + 1} capacity cells "
            f"(> {MAX_DP_CELLS:.0e}); use solver='greedy' (within greedy_gap_bound of optimal)"
        )
    dtype = np.uint8 if max(map(len, options)) <= 256 else np.int32
    choice = np.empty((len(options), cap + 1), dtype=dtype)
    best = np.zeros(cap + 1)  # best[c]: min loss of the blocks so far with offset cost <= c*g
    for b, block in enumerate(options):
        new = np.full(cap + 1, np.inf)
        for j, o in enumerate(block):  # new[c] = min_j best[c - w_j] + D_bj
            w = (o.cost - base[b]) // g
            if w > cap:
                continue
            cand = best[: cap + 1 - w] + o.loss
            better = cand < new[w:]
            new[w:][better] = cand[better]
            choice[b, w:][better] = j
        best = new
    picks, c = [0] * len(options), cap
    for b in reversed(range(len(options))):
        picks[b] = int(choice[b, c])
        c -= (options[b][picks[b]].cost - base[b]) // g
    return picks


def boundary_blocks(options: list[list[Option]], choice: list[int], k: int) -> list[int]:
    """Indices of the ``k`` blocks whose hull upgrades lie closest to the allocation boundary.

    The boundary rate is the best loss-per-bit among the upgrades the allocation did not take;
    a block's distance is ``min |log(rate_e / boundary)|`` over its hull edges ``e``.
    """
    hulls = [lower_convex_hull(o) for o in options]
    rates: list[list[float]] = []
    boundary = 0.0
    for opts, hull, j in zip(options, hulls, choice, strict=True):
        r = [(opts[a].loss - opts[b].loss) / (opts[b].cost - opts[a].cost)
             for a, b in zip(hull, hull[1:], strict=False)]
        rates.append(r)
        taken = hull.index(j) if j in hull else len(hull) - 1
        if taken < len(r):
            boundary = max(boundary, r[taken])
    tiny = 1e-300

    def distance(r: list[float]) -> float:
        if not r:
            return math.inf
        return min(abs(math.log(max(x, tiny) / max(boundary, tiny))) for x in r)

    order = sorted(range(len(options)), key=lambda i: (distance(rates[i]), i))
    return [i for i in order[:k] if rates[i]]
