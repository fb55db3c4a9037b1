r"""Task-aware checks (``tables="checked"``): measured losses where the closed form is weakest.

The closed-form score is the quadratic form ``d^T F d`` of a block's error ``d``: exact for
small errors, an underestimate for large ones (2-bit candidates), and the only judge of which
grid a width gets (``range_objective="auto"``) and of the blocks whose upgrades the knapsack
weighs against each other at its boundary. ``tables="checked"`` measures instead
(:func:`~bayesq_lightning.tables.substitution_tables`): the label-free KL between the trained
model's outputs and its outputs with one candidate substituted, on the first ``check_inputs``
calibration inputs, in the closed form's units (``2 KL ~ d^T F d``). After the allocation, in
order of what is at stake, while the check's budget lasts:

1. **the grid choice**: every grid at each block's chosen width, the blocks taken by their
   chosen loss, largest first. Grids of one width cost the same, so the measurement only
   ranks them: a grid measured worse than another is given at least the other's loss, and
   the knapsack's losses stay in the closed form's scale;
2. **the boundary**: every candidate of the ``check_top_k`` blocks nearest the allocation's
   boundary (:func:`~bayesq_lightning.allocate.boundary_blocks`), whose measured losses (the
   2-bit ones included) replace the closed form's; then the knapsack is solved again.

A row-sampled block's candidates are rounded on every row before they are measured (the
chosen width's would be anyway, :func:`~bayesq_lightning.block_plan.round_chosen`). Each
measured candidate costs one forward pass of the check's inputs, and each measured block one
more (its reference outputs); ``check_budget`` caps the candidates' passes at that share of the
calibration set's size in inputs, so the check's cost follows the fit's (which runs every
calibration input forward and backward). On a model with many blocks the budget can end within
step 1; a budget that allows no measurement at all warns. Under DDP the share is of every
rank's inputs together, and each rank measures on its first ``ceil(check_inputs / world)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .allocate import Option, boundary_blocks
from .batches import batch_size_of, split_batch
from .block_plan import BlockPlan
from .progress import progress as show_progress
from .tables import substitution_tables


def check_plans(model: nn.Module, batches: list, plans: list[BlockPlan], *, n_data: int,
                top_k: int, max_inputs: int | None, budget: float | None,
                allocate: Callable[[list[BlockPlan]], None],
                whole: Callable[[BlockPlan, list[int]], None] | None = None,
                reduce=None, progress: bool = False) -> dict:
    """The checks 1-2 above on allocated ``plans``; ``allocate`` sets every plan's choice and
    ``whole(plan, js)`` rounds the candidates ``js`` of a row-sampled plan on every row
    (:func:`~bayesq_lightning.block_plan.make_whole`; ``None``: no plan is sampled).

    Returns the run's record: candidates measured, forward passes, blocks whose grid the
    measurement changed, boundary blocks measured.
    """
    n_calib, world = sum(batch_size_of(split_batch(b)[0]) for b in batches), 1
    if reduce is not None:  # the inputs and the budget are the whole run's, over every rank
        device = next(model.parameters()).device
        n_calib, world = (int(reduce(torch.tensor(float(x), device=device)).item())
                          for x in (n_calib, 1))
    per_pass = n_calib if max_inputs is None else min(max_inputs, n_calib)
    per_rank = None if max_inputs is None else -(-max_inputs // world)
    left = float("inf") if budget is None else int(budget * n_calib) // max(per_pass, 1)
    record = {"checked_candidates": 0, "check_forward_passes": 0, "check_grids_changed": 0,
              "check_boundary_blocks": 0}

    def measure(i: int, js: list[int]) -> list[float] | None:
        nonlocal left
        if len(js) > left:
            return None
        if plans[i].sampled:
            if whole is None:
                raise ValueError(f"block {plans[i].rows} of {plans[i].layer!r} was scored on "
                                 "a row sample; pass whole= to round its candidates whole")
            whole(plans[i], js)
        losses, passes = substitution_tables(
            model, batches, [(plans[i].layer, plans[i].rows)],
            [[plans[i].candidates[j] for j in js]], n_data=n_data, max_inputs=per_rank,
            reduce=reduce)
        left -= len(js)
        record["checked_candidates"] += len(js)
        record["check_forward_passes"] += passes
        return losses[0]

    if left < 2:
        warnings.warn(f"check_budget={budget} allows no measurement with check_inputs="
                      f"{max_inputs} of {n_calib} calibration inputs: the checks are skipped; "
                      "raise check_budget or lower check_inputs", stacklevel=3)
    winners: dict[int, tuple[list[int], int]] = {}  # block -> its grids, the measured best
    stakes = sorted(range(len(plans)), key=lambda i: -plans[i].options[plans[i].choice].loss)
    for i in show_progress(stakes, progress, "bayesq checks"):             # 1. the grid choice
        js = plans[i].same_width()
        measured = measure(i, js) if len(js) > 1 else None
        if measured is None:
            continue
        best = min(range(len(js)), key=measured.__getitem__)
        floor = plans[i].options[js[best]].loss
        for j in js:
            o = plans[i].options[j]
            loss = o.loss if j == js[best] else math.nextafter(max(o.loss, floor), math.inf)
            plans[i].options[j] = Option(o.cost, loss, o.bits, o.tag)
        record["check_grids_changed"] += js[best] != plans[i].choice
        plans[i].choice = js[best]
        winners[i] = (js, js[best])

    boundary = boundary_blocks([p.options for p in plans], [p.choice for p in plans], top_k)
    for i in boundary:                                                      # 2. the boundary
        js = list(range(len(plans[i].options)))
        measured = measure(i, js)
        if measured is None:
            break
        for j, loss in zip(js, measured, strict=True):
            o = plans[i].options[j]
            plans[i].options[j] = Option(o.cost, loss, o.bits, o.tag)
        record["check_boundary_blocks"] += 1
    if record["check_boundary_blocks"]:
        allocate(plans)
        for i, (js, j) in winners.items():  # a solver's tie-break must not undo a measurement
            if plans[i].choice in js:
                plans[i].choice = j
    return record
