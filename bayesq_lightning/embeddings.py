r"""Quantized embeddings (``BayesQConfig.quantize_embeddings``): the rows calibration looks up.

An ``nn.Embedding`` of weight ``E`` (rows = ids) is a Linear layer on one-hot inputs, so its data
curvature is per row: GPTQ's input matrix is diagonal, ``H = diag(c) / n`` with ``c_i`` the
number of lookups of row ``i`` among the ``n`` lookups of the calibration batches, and the
output error of a quantized ``E`` is :math:`\sum_i (c_i / n) \|\Delta_i\|^2`; within a row no
column couples to another, so there is no error feedback and each row has its own grid. The
posterior's curvature of a row is likewise zero where the row is never looked up.

Rows never looked up have no data curvature, so their loss is zero and the knapsack would give
their blocks the narrowest width: a block holding such a row is held at a floor width instead,
the widest allowed width not above the budget's average bits per weight that keeps the budget
feasible, the grids' metadata included (:func:`floor_unseen_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .batches import batch_inputs, forward_checked, fp32_logits_copy


@torch.no_grad()
def embedding_row_counts(model: nn.Module, batches: Sequence, names: Sequence[str],
                         reduce=None) -> dict[str, Tensor]:
    """How often each row of the embeddings ``names`` is looked up over ``batches`` (float64,
    one forward pass per batch of an fp32 copy sharing the weights; summed over processes with
    ``reduce``)."""
    net, device, modules = fp32_logits_copy(model, share_weights=True)
    counts = {n: torch.zeros(modules[n].num_embeddings, dtype=torch.float64) for n in names}

    def count(name: str, ids: Tensor) -> None:
        found = torch.bincount(ids.reshape(-1).cpu(), minlength=counts[name].numel())
        counts[name] += found.double()

    hooks = [modules[n].register_forward_pre_hook(lambda _m, args, n=n: count(n, args[0]))
             for n in names]
    try:
        for i, batch in enumerate(batches):
            forward_checked(net, batch_inputs([batch], device)[0], i)
    finally:
        for hook in hooks:
            hook.remove()
    if reduce is not None:
        counts = {n: reduce(c.to(device)).cpu() for n, c in counts.items()}
    return counts


def row_weights(counts: Tensor) -> Tensor:
    """GPTQ's diagonal input matrix of an embedding: ``c / n``, the share of lookups per row."""
    total = float(counts.sum())
    if total == 0:
        raise ValueError("the embedding is never looked up on the calibration batches")
    return (counts / total).float()


def tied_input_matrix(a: Tensor, b: Tensor) -> Tensor:
    """GPTQ's input matrix of a weight used by two layers (the sum of both uses' errors).

    An embedding's row weights (1-D) and a Linear head's ``H`` (2-D, over the embedding
    dimension) combine as ``H + mean(c / n) I``: the head's coupling kept, the embedding's
    per-row weights replaced by their mean.
    """
    if a.dim() == b.dim():
        return a + b
    rows, full = (a, b) if a.dim() == 1 else (b, a)
    return full + float(rows.mean()) * torch.eye(full.shape[0], dtype=full.dtype,
                                                  device=full.device)


def floor_unseen_rows(plans: Sequence, counts: dict[str, Tensor], allowed: Sequence[int],
                      budget: int, n_weights: int) -> dict:
    """Hold every block with a never-looked-up row of an embedding in ``counts`` at a floor
    width: its candidates narrower than the floor are dropped (a block with none as wide keeps
    its widest). The floor is the widest allowed width not above the budget's average bits per
    weight at which the cheapest allocation still fits the budget (metadata included); none if
    no width does. Returns ``{"bits": floor, "blocks": [...]}`` (``bits`` ``None``: no floor).
    """
    held = [p for p in plans if p.layer in counts
            and not bool((counts[p.layer][p.rows[0]:p.rows[1]] > 0).all())]
    free = sum(min(o.cost for o in p.options) for p in plans if p not in held)

    def kept(plan, floor: int) -> list[int]:
        idx = [i for i, s in enumerate(plan.specs) if s.bits >= floor]
        widest = max(s.bits for s in plan.specs)
        return idx or [i for i, s in enumerate(plan.specs) if s.bits == widest]

    for floor in sorted((b for b in allowed if b <= budget / n_weights), reverse=True):
        if not held:
            break
        need = free + sum(min(p.options[i].cost for i in kept(p, floor)) for p in held)
        if need <= budget:
            for p in held:
                idx = kept(p, floor)
                p.specs = [p.specs[i] for i in idx]
                p.candidates = [p.candidates[i] for i in idx]
                p.options = [p.options[i] for i in idx]
            return {"bits": floor, "blocks": [f"{p.layer}[{p.rows[0]}:{p.rows[1]}]"
                                              for p in held]}
    return {"bits": None, "blocks": []}
