r"""``quantize_model``: posterior -> candidate quantizers -> tables -> knapsack -> packed model.

A *block* is a slice of a layer's output channels that gets one bit-width (one block per layer by
default, ``block_rows`` rows otherwise). For every block, allowed bit-width ``b`` and quantizer
(uniform grid or non-uniform codebook) a candidate is designed and scored:

* ``bayesq``: the range / codebook is designed under the diagonal of the posterior precision
  :math:`\lambda`; the loss is the deployed risk :math:`(q - \mu)^\top \Lambda (q - \mu)` in
  the posterior's structure (:class:`Metric`): ``diag`` :math:`\sum_i \lambda_i \Delta_i^2`,
  ``kron`` :math:`\mathrm{tr}(G \Delta A \Delta^\top) + \delta \|\Delta\|^2` with codes from
  error-feedback rounding under :math:`A + \delta I`, ``lowrank`` with its eigenpairs; or the
  task-aware Monte-Carlo KL of :func:`~bayesq_lightning.tables.mc_tables` (``tables="mc"``,
  samples drawn from the diagonal of the precision);
* ``rtn``: min-max range (k-means codebook), loss :math:`\sum_i (q_i - w_i)^2`, no posterior;
* ``mse``: as ``bayesq`` with :math:`\lambda = 1` (the posterior ablated);
* ``hawq``: min-max range, loss ``mean(diag GGN) * ||q - w||^2`` (Hessian trace x error);
* ``gptq``: min-max range, codes by error-feedback rounding under ``H = X X^T / n`` of the
  layer's calibration inputs, loss the output reconstruction error ``tr(dW H dW^T)``.

Costs are :func:`~bayesq_lightning.tables.storage_bits`; the knapsack picks one candidate per
block under ``bits * n_weights`` (or ``8 * budget_bytes``) stored bits, metadata included.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .allocate import InfeasibleBudgetError, Option, allocate, lower_convex_hull
from .config import BayesQConfig
from .modules import replace_quantized_layers
from .posterior import (
    Posterior,
    calibration_samples,
    check_finite,
    clone_module,
    fit_posterior,
    quantizable_layers,
)
from .quantizers import dequantize, design_nonuniform, design_uniform
from .result import BlockResult, LayerResult, QuantizationResult
from .rounding import (
    block_column_quantizer,
    error_feedback_round,
    gptq_gamma,
    layer_input_hessians,
)
from .tables import block_storage_bits, mc_tables, storage_bits


@dataclass
class Metric:
    r"""The loss of a block's weight error :math:`\Delta W = Q - \mu` (rows x cols).

    Exactly one form is set: ``diag`` (per-weight weights, or a scalar), ``kron``
    (:math:`\mathrm{tr}(G_B \Delta W A \Delta W^T) + \delta \|\Delta W\|^2`, ``G_B`` the block's
    rows of ``G``), ``lowrank`` (:math:`\Delta w^T (\mathrm{diag}(d) + U_B S U_B^T) \Delta w`
    with ``d`` the residual plus :math:`\delta`), or ``output``
    (:math:`\mathrm{tr}(\Delta W H \Delta W^T)`, per group for grouped convs).
    """

    diag: torch.Tensor | float | None = None
    kron: tuple[torch.Tensor, torch.Tensor, float] | None = None
    lowrank: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    output: torch.Tensor | None = None
    layer_rows: int = 0
    rows: tuple[int, int] = (0, 0)

    def __call__(self, dW: torch.Tensor) -> float:
        dW = dW.double()
        if self.diag is not None:
            w = self.diag.double() if torch.is_tensor(self.diag) else self.diag
            return float((w * dW * dW).sum())
        if self.kron is not None:
            G, A, delta = self.kron
            return float(((G.double() @ dW @ A.double()) * dW).sum() + delta * (dW * dW).sum())
        if self.lowrank is not None:
            d, U, S = self.lowrank
            proj = U.double().T @ dW.reshape(-1)
            return float((d.double() * dW * dW).sum() + (S.double() * proj * proj).sum())
        H = self.output if self.output.dim() == 3 else self.output.unsqueeze(0)
        per = self.layer_rows // H.shape[0]
        total = 0.0
        for g, (a, b) in _group_pieces(self.rows, per):
            total += float(((dW[a:b] @ H[g].double()) * dW[a:b]).sum())
        return total


@dataclass
class Block:
    """One allocation unit: rows ``rows`` of layer ``layer``, its metric and rounding matrix."""

    layer: str
    rows: tuple[int, int]
    w: torch.Tensor  # (rows, cols) fp32 weights (posterior mean)
    precision: torch.Tensor | None  # per-weight precision designing the grid; None: min-max
    metric: Metric
    bits: tuple[int, ...]  # allowed widths after the per-layer pins
    H: torch.Tensor | None = None  # input-side matrix of error-feedback rounding
    gamma: float | None = None  # its damping; None: GPTQ's 1% of the mean diagonal
    layer_rows: int = 0


def _group_pieces(rows: tuple[int, int], per: int):
    """``(group, (a, b))`` for the groups of ``per`` rows meeting ``rows``; a, b block-relative."""
    r0, r1 = rows
    for g in range(r0 // per, (r1 - 1) // per + 1):
        yield g, (max(r0, g * per) - r0, min(r1, (g + 1) * per) - r0)


def _pinned_bits(name: str, cfg: BayesQConfig) -> tuple[int, ...]:
    """``allowed_bits`` restricted by every matching ``min_bits`` / ``max_bits`` pattern."""
    lo = max([b for p, b in (cfg.min_bits or {}).items() if fnmatch.fnmatchcase(name, p)],
             default=0)
    hi = min([b for p, b in (cfg.max_bits or {}).items() if fnmatch.fnmatchcase(name, p)],
             default=99)
    bits = tuple(b for b in cfg.allowed_bits if lo <= b <= hi)
    if not bits:
        raise ValueError(
            f"layer {name!r}: allowed_bits={cfg.allowed_bits} has no width within its pins "
            f"[{lo}, {hi}]; add a width in that range to allowed_bits or relax min_bits/max_bits"
        )
    return bits


def _blocks(named, cfg: BayesQConfig, posterior: Posterior | None,
            hessians: dict | None = None) -> list[Block]:
    """Split every layer into allocation blocks, each with its metric and rounding inputs."""
    blocks = []
    for name, module in named:
        w = module.weight.detach().float().reshape(module.weight.shape[0], -1).cpu()
        lp = None if posterior is None else posterior.layers[name]
        step = cfg.block_rows or w.shape[0]
        for r0 in range(0, w.shape[0], step):
            r1 = min(r0 + step, w.shape[0])
            rows, out = (r0, r1), w.shape[0]
            precision, H, gamma = None, None, None
            if cfg.method == "bayesq":
                precision = lp.precision.reshape_as(w)[r0:r1].float().cpu()
                metric = Metric(diag=precision)
                if lp.structure == "kron" and lp.A is not None:
                    G, A = lp.G.double().cpu(), lp.A.double().cpu()
                    metric = Metric(kron=(G[r0:r1, r0:r1], A, lp.prior_precision))
                    # mean(diag G) = 1, so the prior implies gamma = delta / mean(diag G) = delta
                    H, gamma = A.float(), lp.prior_precision
                elif lp.structure == "lowrank" and lp.U is not None:
                    cols = w.shape[1]
                    d = lp.residual.reshape_as(w)[r0:r1].cpu() + lp.prior_precision
                    metric = Metric(lowrank=(d, lp.U[r0 * cols: r1 * cols].cpu(), lp.S.cpu()))
            elif cfg.method == "mse":  # the posterior ablated: same search and tables, unit weights
                precision = torch.ones(r1 - r0, w.shape[1])
                metric = Metric(diag=1.0)
            elif cfg.method == "hawq":  # mean GGN diagonal: the layer's Hessian trace per weight
                metric = Metric(diag=float((lp.precision - lp.prior_precision).mean()))
            elif cfg.method == "gptq":
                H = hessians[name].cpu()  # every metric input lives on the CPU
                metric = Metric(output=H, layer_rows=out, rows=rows)
            else:
                metric = Metric(diag=1.0)
            blocks.append(Block(name, rows, w[r0:r1], precision, metric, _pinned_bits(name, cfg),
                                H, gamma, out))
    return blocks


def _design(block: Block, bits: int, quantizer: str, cfg: BayesQConfig) -> BlockResult:
    """The candidate quantizer of ``block`` at ``bits``, codes of the mean included.

    The posterior mixture (``range_objective="expected"``) only exists for ``bayesq``; the
    baselines always design for the stored weights (``"deployed"``).
    """
    objective = cfg.range_objective if cfg.method == "bayesq" else "deployed"
    if quantizer == "uniform":
        grid = design_uniform(block.w, bits, precision=block.precision,
                              group_size=cfg.group_size, objective=objective)
        return BlockResult(block.rows, bits, "uniform", cfg.group_size, grid.codes,
                           grid.scale, grid.zero)
    grid = design_nonuniform(block.w, bits, precision=block.precision,
                             per_row=cfg.per_row_codebook, objective=objective)
    return BlockResult(block.rows, bits, "nonuniform", None, grid.codes,
                       codebook=grid.codebook)


def _feedback(block: Block, cand: BlockResult) -> BlockResult:
    """Re-round ``cand``'s codes with error feedback under ``block.H`` on the same grid.

    A grouped/depthwise conv has one ``H`` per group (``(groups, cols, cols)``): each group's
    rows inside the block are rounded under their own matrix.
    """
    H = block.H if block.H.dim() == 3 else block.H.unsqueeze(0)
    codes = []
    for g, (a, b) in _group_pieces(block.rows, block.layer_rows // H.shape[0]):
        gamma = gptq_gamma(H[g]) if block.gamma is None else block.gamma
        c, _, _ = error_feedback_round(block.w[a:b], H[g], block_column_quantizer(cand, a, b),
                                       gamma)
        codes.append(c)
    return dataclasses.replace(cand, codes=torch.cat(codes))


def candidate_loss(block: Block, candidate: BlockResult) -> float:
    """The block's metric of the stored weights' error from the mean."""
    return block.metric(dequantize(candidate, torch.float64) - block.w.double())


def _quantizers(cfg: BayesQConfig) -> tuple[str, ...]:
    return ("uniform", "nonuniform") if cfg.quantizer == "auto" else (cfg.quantizer,)


def _layer_kind(module: nn.Module) -> str:
    return "conv2d" if isinstance(module, nn.Conv2d) else "linear"


def _budget_bits(cfg: BayesQConfig, n_weights: int) -> int:
    if cfg.budget_bytes is not None:
        return 8 * cfg.budget_bytes
    return math.floor(cfg.bits * n_weights + 1e-9)


def _progress(items: Iterable, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


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


def quantize_model(
    model: nn.Module,
    calibration_loader: Iterable | None,
    config: BayesQConfig | None = None,
    *,
    n_data: int | None = None,
    reduce=None,
    progress: bool = True,
    posterior: Posterior | None = None,
) -> QuantizationResult:
    """Quantize the Linear/Conv2d weights of ``model`` to a mixed-precision budget.

    Parameters
    ----------
    model : nn.Module
        Trained model; left untouched (all work happens on copies).
    calibration_loader : iterable of batches
        ``(inputs, targets)`` tuples, bare inputs or dict batches; the first
        ``config.calib_batches`` are used. May be ``None`` for ``method="rtn"``.
    config : BayesQConfig, optional
        Defaults to ``BayesQConfig()``.
    n_data : int, optional
        Overrides ``config.n_data`` (the callback passes the training-set size).
    reduce : callable, optional
        Cross-process sum used by the posterior fit under a distributed strategy.
    progress : bool
        Show progress bars.
    posterior : Posterior, optional
        A posterior fitted earlier on this model (e.g. ``result.posterior`` of a run at another
        budget) to reuse instead of fitting again; its structure must match the config.

    Returns
    -------
    QuantizationResult
        ``model`` holds packed ``QuantizedLinear`` / ``QuantizedConv2d`` layers.
    """
    cfg = config or BayesQConfig()
    t_start = time.perf_counter()
    named = quantizable_layers(model, cfg.include, cfg.exclude)
    if any(name == "" for name, _ in named):
        raise ValueError("the model itself is a Linear/Conv2d layer and cannot be replaced in "
                         "place; wrap it in a parent module (e.g. nn.Sequential(layer))")
    check_finite(named)
    pins = {name: _pinned_bits(name, cfg) for name, _ in named}  # fail before any work
    for field in ("min_bits", "max_bits"):
        for pattern in getattr(cfg, field) or {}:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in pins):
                raise ValueError(f"{field} pattern {pattern!r} matches no quantized layer; "
                                 f"layers: {list(pins)}")
    info: dict = {"method": cfg.method, "config": cfg.to_dict()}

    hessians: dict | None = None
    batches: list = []
    if cfg.method != "rtn":
        if calibration_loader is None:
            raise ValueError(f"method={cfg.method!r} needs a calibration loader "
                             "(method='rtn' does not)")
        batches, n_calib = calibration_samples(calibration_loader, cfg.calib_batches)
    if cfg.method == "gptq":
        t_h = time.perf_counter()
        hessians = layer_input_hessians(model, batches, list(pins), reduce=reduce)
        info.update(n_calib=n_calib, hessian_seconds=time.perf_counter() - t_h)
    wanted = cfg.structure if cfg.method == "bayesq" else "diag"
    reused = posterior is not None
    if reused and (posterior.structure != wanted or set(posterior.layers) != set(pins)
                   or cfg.method not in ("bayesq", "hawq")):
        raise ValueError(
            f"the given posterior ({posterior.structure}, layers {sorted(posterior.layers)}) does "
            f"not match this run (method {cfg.method!r}, {wanted}, layers {sorted(pins)}); fit "
            "it with the same structure and layer selection, or pass posterior=None"
        )
    if cfg.method in ("bayesq", "hawq") and posterior is None:
        if reduce is not None:  # the fallback must be the global count, as in the fit
            n_calib = int(reduce(torch.tensor(float(n_calib))).item())
        n_data = n_data or cfg.n_data or _dataset_len(calibration_loader) or n_calib
        posterior = fit_posterior(
            model, batches, list(pins), n_data=n_data, prior_precision=cfg.prior_precision,
            backend=cfg.backend, reduce=reduce,
            structure=wanted,
            rank=cfg.rank if cfg.structure == "lowrank" else None,
        )
    if posterior is not None:
        info.update(
            structure=posterior.structure, prior_precision=posterior.prior_precision,
            n_data=posterior.n_data, n_calib=posterior.n_calib, backend=posterior.backend,
            labels=posterior.labels, posterior_seconds=posterior.seconds,
            posterior_reused=reused,
        )

    t_tables = time.perf_counter()
    blocks = _blocks(named, cfg, posterior, hessians)
    options: list[list[Option]] = []
    candidates: list[list[BlockResult]] = []
    for block in _progress(blocks, progress, "bayesq candidates"):
        opts, cands = [], []
        for bits in block.bits:
            for quantizer in _quantizers(cfg):
                cand = _design(block, bits, quantizer, cfg)
                if block.H is not None:  # gptq, bayesq-kron: error-feedback rounding
                    cand = _feedback(block, cand)
                loss = candidate_loss(block, cand)
                opts.append(Option(block_storage_bits(cand), loss, bits, quantizer))
                cands.append(cand)
        options.append(opts)
        candidates.append(cands)
    info["tables_seconds"] = time.perf_counter() - t_tables

    n_weights = sum(m.weight.numel() for _, m in named)
    budget = _budget_bits(cfg, n_weights)
    t_alloc = time.perf_counter()
    choice = _allocate(options, budget, cfg, n_weights)
    info["allocation_seconds"] = time.perf_counter() - t_alloc

    if cfg.tables == "mc":
        refine = list(range(len(blocks)))
        if cfg.mc_refine_top_k is not None:
            refine = boundary_blocks(options, choice, cfg.mc_refine_top_k)
        t_mc = time.perf_counter()
        mc = mc_tables(
            model, batches, posterior, [(blocks[i].layer, blocks[i].rows) for i in refine],
            [candidates[i] for i in refine], n_data=posterior.n_data, samples=cfg.mc_samples,
            seed=cfg.seed, reduce=reduce, progress=progress,
        )
        for i, losses in zip(refine, mc.losses, strict=True):
            options[i] = [Option(o.cost, max(loss, 0.0), o.bits, o.tag)
                          for o, loss in zip(options[i], losses, strict=True)]
        choice = _allocate(options, budget, cfg, n_weights)
        info.update(mc_blocks=len(refine), mc_forward_passes=mc.forward_passes,
                    mc_seconds=time.perf_counter() - t_mc)

    layers = _layer_results(named, blocks, options, candidates, choice)
    # The returned model holds packed integer weights (QuantizedLinear / QuantizedConv2d).
    qmodel = clone_module(model)  # dtypes kept as they are (e.g. fp32 norms in a bf16 model)
    replace_quantized_layers(qmodel, layers)
    total_bits = sum(opts[j].cost for opts, j in zip(options, choice, strict=True))
    code_bits = sum(storage_bits(b.n_weights, b.bits, 0) for x in layers for b in x.blocks)
    info["seconds"] = time.perf_counter() - t_start
    return QuantizationResult(
        model=qmodel, layers=layers, bits_per_weight=total_bits / n_weights,
        code_bits_per_weight=code_bits / n_weights, budget_bits=budget, info=info,
        posterior=posterior,
    )


def _allocate(options, budget: int, cfg: BayesQConfig, n_weights: int) -> list[int]:
    """:func:`allocate`, with an infeasible ``budget_bytes`` stated in bytes."""
    if cfg.budget_bytes is None:
        return allocate(options, budget, solver=cfg.solver, n_weights=n_weights)
    try:
        return allocate(options, budget, solver=cfg.solver)
    except InfeasibleBudgetError as err:
        need = -(-err.min_cost // 8)
        raise InfeasibleBudgetError(
            f"budget_bytes={cfg.budget_bytes} is infeasible: the cheapest allocation needs "
            f"{need} bytes (metadata included); raise budget_bytes to at least {need} or allow "
            "fewer bits", err.min_cost) from None


def _layer_results(named, blocks, options, candidates, choice) -> list[LayerResult]:
    per_layer: dict[str, list[int]] = {}
    for i, block in enumerate(blocks):
        per_layer.setdefault(block.layer, []).append(i)
    layers = []
    for name, module in named:
        idx = per_layer[name]
        chosen = [options[i][choice[i]] for i in idx]
        layers.append(LayerResult(
            name, _layer_kind(module), tuple(module.weight.shape),
            [candidates[i][choice[i]] for i in idx],
            sum(o.loss for o in chosen), sum(o.cost for o in chosen) // 8,
        ))
    return layers


def _dataset_len(loader) -> int | None:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None
