"""Task-aware tables ``D[block][bits]``: Monte-Carlo (``tables="mc"``) and measured
substitutions (``tables="checked"``, :mod:`~bayesq_lightning.checks`).

Closed-form scores are the posterior's own quadratic form
(:meth:`~bayesq_lightning.posterior.LayerPosterior.quad_form`); costs are
:func:`~bayesq_lightning.quantizers.storage_bits`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .batches import batch_inputs, batch_size_of, fp32_logits_copy, split_batch
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
        means = [posterior.layers[name].mean[r0:r1] for name, (r0, r1) in blocks]
        kls, n = _substitution_kls(net, xs, modules, blocks, candidates, means)
        for b, kl in enumerate(kls):
            values[b][:, s] = kl
        passes += n
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


def _substitution_kls(net, xs: list, modules: dict, blocks, candidates,
                      means: Sequence | None) -> tuple[list[torch.Tensor], int]:
    """Per block, per candidate: the sum over inputs of KL(net || net with the block's rows
    set to the candidate), less the same with the rows set to ``means[b]`` (``None``: no
    reference, the net's own weights are the mean). Returns the sums and the forward passes."""
    base = [net(x).float().log_softmax(-1) for x in xs]
    passes, out = len(xs), []
    for b, ((name, (r0, r1)), cands) in enumerate(zip(blocks, candidates, strict=True)):
        weight = modules[name].weight
        rows = weight[r0:r1].clone()
        ref = 0.0
        if means is not None:
            ref = _kl_sum(net, xs, base, weight, (r0, r1), means[b].to(weight.device,
                                                                        weight.dtype))
            passes += len(xs)
        kl = torch.zeros(len(cands), dtype=torch.float64)
        for j, cand in enumerate(cands):
            q = dequantize(cand, weight.dtype).to(weight.device)
            kl[j] = _kl_sum(net, xs, base, weight, (r0, r1), q) - ref
        passes += len(xs) * len(cands)
        weight[r0:r1] = rows
        out.append(kl)
    return out, passes


@torch.no_grad()
def substitution_tables(model: nn.Module, batches: list,
                        blocks: Sequence[tuple[str, tuple[int, int]]],
                        candidates: Sequence[Sequence[BlockResult]], *, n_data: int,
                        max_inputs: int | None = None, reduce=None, progress: bool = False
                        ) -> tuple[list[list[float]], int]:
    r"""Measured loss of substituting each candidate into the trained model, without labels.

    .. math::

        D = 2 n_\text{data} \, \overline{KL}(p(\cdot|x, \mu) \,\|\,
            p(\cdot|x, \mu[B \leftarrow q])),

    the mean over the first ``max_inputs`` calibration inputs (all: ``None``), at the trained
    weights ``mu`` (the posterior mean): :func:`mc_tables` without sampling, in the same units
    as the closed-form score (``2 KL ~ d^T F d`` to second order) but exact in ``d``, so it
    holds for the large perturbations where the quadratic form underestimates the loss.

    With ``reduce`` (a cross-process sum) every rank gets the losses over all ranks' inputs.
    Returns the losses per block and candidate, and the forward passes spent.
    """
    net, device, modules = fp32_logits_copy(model)
    xs = batch_inputs(_first_inputs(batches, max_inputs), device)
    count = torch.tensor(float(sum(batch_size_of(x) for x in xs)), dtype=torch.float64)
    kls, passes = _substitution_kls(net, xs, modules, blocks, candidates, None)
    if reduce is not None:
        count = reduce(count.to(device)).cpu()
        kls = [reduce(kl.to(device)).cpu() for kl in kls]
    return [(2.0 * n_data * kl / count).clamp_min(0).tolist() for kl in kls], passes


def _first_inputs(batches: list, limit: int | None) -> list:
    """The leading batches holding the first ``limit`` inputs (the last one cut)."""
    if limit is None:
        return batches
    out, n = [], 0
    for batch in batches:
        x = split_batch(batch)[0]
        size = batch_size_of(x)
        if n + size > limit:
            keep = limit - n
            if keep > 0:
                out.append({k: v[:keep] for k, v in x.items()} if isinstance(x, Mapping)
                           else x[:keep])
            break
        out.append(batch)
        n += size
    return out


def _kl_sum(net, xs, base, weight, rows: tuple[int, int], replacement) -> float:
    """Sum over inputs of KL(base || net with ``weight[rows]`` set to ``replacement``)."""
    r0, r1 = rows
    weight[r0:r1] = replacement.reshape(weight[r0:r1].shape)
    total = 0.0
    for x, logp in zip(xs, base, strict=True):
        logq = net(x).float().log_softmax(-1)
        total += float((logp.exp() * (logp - logq)).sum())
    return total
