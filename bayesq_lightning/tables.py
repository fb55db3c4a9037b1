"""Task-aware Monte-Carlo tables ``D[block][bits]`` (``tables="mc"``).

Closed-form scores are the posterior's own quadratic form
(:meth:`~bayesq_lightning.posterior.LayerPosterior.quad_form`); costs are
:func:`~bayesq_lightning.quantizers.storage_bits`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .batches import batch_inputs, batch_size_of, fp32_logits_copy
from .progress import progress as show_progress
from .quantizers import dequantize
from .result import BlockResult


@dataclass
class MCTables:
    """Monte-Carlo task-aware losses per block and candidate, with their standard errors."""

    losses: list[list[float]]
    stderr: list[list[float]]
    forward_passes: int


@torch.no_grad()
def mc_tables(
    model: nn.Module,
    batches: list,
    posterior,
    blocks: Sequence[tuple[str, tuple[int, int]]],
    candidates: Sequence[Sequence[BlockResult]],
    *,
    n_data: int,
    samples: int = 4,
    seed: int = 0,
    prior: bool = False,
    temperature: float = 1.0,
    reduce=None,
    progress: bool = False,
) -> MCTables:
    r"""Task-aware expected loss of every candidate, by posterior sampling.

    For posterior samples :math:`w_s \sim N(\mu, T \Lambda^{-1})` of the quantized layers, in
    the fitted structure (each layer's
    :meth:`~bayesq_lightning.posterior.LayerPosterior.sample`; ``T = temperature``) and the
    calibration inputs :math:`x`,

    .. math::

        D = 2 n_\text{data} \, \overline{KL}(p(\cdot|x, w_s) \,\|\, p(\cdot|x, w_s[B \leftarrow q]))
            - (\text{same with } B \leftarrow \mu_B) \;[+ \delta \|q - \mu_B\|^2] ,

    the mean over samples and inputs. To second order :math:`2 KL \approx d^\top F d`, so ``D``
    is in the units of the closed-form curvature score; the subtracted reference (the block set
    to its posterior mean) removes the per-block constant :math:`\mathrm{tr}(F \Sigma_B)`, which
    does not change the allocation, and most of the sampling noise. The prior term in brackets
    is added only with ``prior=True`` (the ``score="posterior_precision"`` ablation), so that
    both tables share the units of the closed form they refine.

    Cost: ``samples * (1 + sum_blocks (1 + candidates))`` forward passes over the batches.
    """
    if int(samples) != samples or samples < 1:
        raise ValueError(f"samples={samples!r}: Monte-Carlo tables need at least one posterior "
                         "sample (mc_samples >= 1)")
    net, device, modules = fp32_logits_copy(model)
    xs = batch_inputs(batches, device)
    layers = sorted({name for name, _ in blocks})
    gen = torch.Generator().manual_seed(seed)
    # per block, per candidate, per sample: the KL difference (summed over inputs)
    values = [torch.zeros(len(c), samples, dtype=torch.float64) for c in candidates]
    count = torch.tensor(float(sum(batch_size_of(x) for x in xs)), dtype=torch.float64)
    if reduce is not None:
        count = reduce(count.to(device)).cpu()
    passes = 0
    for s in show_progress(range(samples), progress, "bayesq mc tables"):
        for name in layers:
            w_s = posterior.layers[name].sample(1, temperature, generator=gen)[0]
            modules[name].weight.copy_(w_s.to(device))
        base = [net(x).float().log_softmax(-1) for x in xs]
        passes += len(xs)
        for b, ((name, (r0, r1)), cands) in enumerate(zip(blocks, candidates, strict=True)):
            weight = modules[name].weight
            rows = weight[r0:r1].clone()
            mean = posterior.layers[name].mean[r0:r1].to(device, weight.dtype)

            ref = _kl_sum(net, xs, base, weight, (r0, r1), mean)
            for j, cand in enumerate(cands):
                q = dequantize(cand, weight.dtype).to(device)
                values[b][j, s] = _kl_sum(net, xs, base, weight, (r0, r1), q) - ref
            passes += len(xs) * (1 + len(cands))
            weight[r0:r1] = rows
    losses, stderr = [], []
    for (name, (r0, r1)), cands, v in zip(blocks, candidates, values, strict=True):
        if reduce is not None:
            v = reduce(v.to(device)).cpu()
        v = 2.0 * n_data * v / count
        mean_s = v.mean(1)
        se = v.std(1) / math.sqrt(samples) if samples > 1 else torch.full_like(mean_s, math.nan)
        if prior:
            lp = posterior.layers[name]
            mu = lp.mean[r0:r1].reshape(r1 - r0, -1).double().cpu()
            mean_s = mean_s + torch.tensor([
                lp.prior_precision * float(((dequantize(c, torch.float64) - mu) ** 2).sum())
                for c in cands
            ], dtype=torch.float64)
        losses.append(mean_s.tolist())
        stderr.append(se.tolist())
    return MCTables(losses, stderr, passes)


def _kl_sum(net, xs, base, weight, rows: tuple[int, int], replacement) -> float:
    """Sum over inputs of KL(base || net with ``weight[rows]`` set to ``replacement``)."""
    r0, r1 = rows
    weight[r0:r1] = replacement.reshape(weight[r0:r1].shape)
    total = 0.0
    for x, logp in zip(xs, base, strict=True):
        logq = net(x).float().log_softmax(-1)
        total += float((logp.exp() * (logp - logq)).sum())
    return total
