r"""Task-aware checks (``tables="checked"``): measured losses where the closed form is weakest.

The closed-form score is the quadratic form ``d^T F d`` of a block's error ``d``: exact for
small errors, an underestimate for large ones (2-bit candidates), and the only judge of which
grid a width gets (``range_objective="auto"``) and of the blocks whose upgrades the knapsack
weighs against each other at its boundary. ``tables="checked"`` replaces those losses by the
measured one, :func:`~bayesq_lightning.tables.substitution_tables`: the label-free KL between
the trained model's outputs and its outputs with the candidate substituted, on the first
``check_inputs`` calibration inputs, in the same units. In order:

1. every block's candidates at its narrowest width (the large perturbations);
2. allocate; then every candidate of the ``check_top_k`` blocks nearest the allocation's
   boundary (:func:`~bayesq_lightning.allocate.boundary_blocks`), and every grid at each
   block's chosen width (the grid choice);
3. allocate again with every measured loss in place.

Each candidate is measured at most once: one forward pass of the check's inputs per candidate.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .allocate import Option, boundary_blocks
from .block_plan import BlockPlan
from .tables import substitution_tables


def _measure(model: nn.Module, batches: list, plans: list[BlockPlan],
             wanted: list[list[int]], measured: list[set[int]], n_data: int,
             max_inputs: int | None, reduce, progress: bool) -> int:
    """Replace the losses of the candidates ``wanted[i]`` of ``plans[i]`` (those not yet
    measured) by their measured losses; returns the forward passes spent."""
    todo = [(i, [j for j in w if j not in measured[i]]) for i, w in enumerate(wanted)]
    todo = [(i, js) for i, js in todo if js]
    if not todo:
        return 0
    losses, passes = substitution_tables(
        model, batches, [(plans[i].layer, plans[i].rows) for i, _ in todo],
        [[plans[i].candidates[j] for j in js] for i, js in todo], n_data=n_data,
        max_inputs=max_inputs, reduce=reduce, progress=progress)
    for (i, js), values in zip(todo, losses, strict=True):
        for j, loss in zip(js, values, strict=True):
            o = plans[i].options[j]
            plans[i].options[j] = Option(o.cost, loss, o.bits, o.tag)
        measured[i].update(js)
    return passes


def check_plans(model: nn.Module, batches: list, plans: list[BlockPlan], *, n_data: int,
                top_k: int, max_inputs: int | None,
                allocate: Callable[[list[BlockPlan]], None], reduce=None,
                progress: bool = False) -> dict:
    """The checks 1-3 above on allocated ``plans``; ``allocate`` sets every plan's choice.

    Returns the run's record: candidates measured and forward passes.
    """
    measured: list[set[int]] = [set() for _ in plans]
    narrowest = [[j for j, o in enumerate(p.options) if o.bits == min(p.bits)] for p in plans]
    passes = _measure(model, batches, plans, narrowest, measured, n_data, max_inputs, reduce,
                      progress)
    allocate(plans)
    boundary = set(boundary_blocks([p.options for p in plans], [p.choice for p in plans],
                                   top_k))
    wanted = [list(range(len(p.options))) if i in boundary else
              [j for j, o in enumerate(p.options) if o.bits == p.options[p.choice].bits]
              for i, p in enumerate(plans)]
    passes += _measure(model, batches, plans, wanted, measured, n_data, max_inputs, reduce,
                      progress)
    allocate(plans)
    return {"checked_candidates": sum(map(len, measured)), "check_forward_passes": passes,
            "check_boundary_blocks": len(boundary)}
