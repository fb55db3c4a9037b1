r"""``quantize_model``: posterior -> candidate quantizers -> tables -> knapsack -> quantized model.

For every block (one layer by default) and every allowed bit-width ``b`` a quantizer is designed
and scored:

* ``bayesq``: range chosen by the posterior-expected whitened distortion; loss is the deployed
  risk :math:`D = \sum_i \lambda_i (q_i - \mu_i)^2` (precision-weighted squared error of the
  deployed weights ``q`` from the posterior mean ``mu``).
* ``rtn``: min-max range, loss :math:`\sum_i (q_i - w_i)^2` (no posterior, no data).

Costs are :func:`~bayesq_lightning.tables.storage_bits`; the knapsack picks one option per block
under ``bits * n_weights`` (or ``8 * budget_bytes``) stored bits, metadata included.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
from torch import nn

from .allocate import Option, allocate
from .config import BayesQConfig
from .modules import replace_quantized_layers
from .posterior import (
    Posterior,
    calibration_samples,
    check_finite,
    clone_fp32,
    fit_posterior,
    quantizable_layers,
)
from .quantizers import dequantize, design_uniform
from .result import BlockResult, LayerResult, QuantizationResult
from .tables import block_storage_bits, storage_bits


def _candidates(
    w2d: torch.Tensor, bits: int, cfg: BayesQConfig, precision: torch.Tensor | None
) -> tuple[BlockResult, float]:
    """The quantized block at ``bits`` and its expected loss ``D``."""
    rows = (0, w2d.shape[0])
    if precision is None:  # rtn
        grid = design_uniform(w2d, bits)
    else:
        grid = design_uniform(w2d, bits, precision=precision, objective=cfg.range_objective)
    block = BlockResult(rows, bits, "uniform", None, grid.codes, grid.scale, grid.zero)
    err2 = (dequantize(block, torch.float64) - w2d.double()) ** 2
    weight = 1.0 if precision is None else precision.double()
    return block, float((weight * err2).sum())


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


def quantize_model(
    model: nn.Module,
    calibration_loader: Iterable | None,
    config: BayesQConfig | None = None,
    *,
    n_data: int | None = None,
    reduce=None,
    progress: bool = True,
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
        Show a progress bar over layers.

    Returns
    -------
    QuantizationResult
    """
    cfg = config or BayesQConfig()
    t_start = time.perf_counter()
    named = quantizable_layers(model, cfg.include, cfg.exclude)
    check_finite(named)
    info: dict = {"method": cfg.method, "config": cfg.to_dict()}

    posterior: Posterior | None = None
    if cfg.method == "bayesq":
        if calibration_loader is None:
            raise ValueError("method='bayesq' needs a calibration loader (method='rtn' does not)")
        batches, n_calib = calibration_samples(calibration_loader, cfg.calib_batches)
        n_data = n_data or cfg.n_data or _dataset_len(calibration_loader) or n_calib
        posterior = fit_posterior(
            model, batches, [n for n, _ in named], n_data=n_data,
            prior_precision=cfg.prior_precision, backend=cfg.backend, reduce=reduce,
        )
        info.update(
            structure=posterior.structure, prior_precision=posterior.prior_precision,
            n_data=posterior.n_data, n_calib=posterior.n_calib, backend=posterior.backend,
            labels=posterior.labels, posterior_seconds=posterior.seconds,
        )

    t_tables = time.perf_counter()
    options: list[list[Option]] = []
    blocks: list[list[BlockResult]] = []
    for name, module in _progress(named, progress, "bayesq tables"):
        w2d = module.weight.detach().float().reshape(module.weight.shape[0], -1).cpu()
        precision = None
        if posterior is not None:
            precision = posterior.layers[name].precision.reshape_as(w2d).cpu().float()
        layer_opts, layer_blocks = [], []
        for bits in cfg.allowed_bits:
            block, loss = _candidates(w2d, bits, cfg, precision)
            layer_opts.append(Option(block_storage_bits(block), loss, bits, block.quantizer))
            layer_blocks.append(block)
        options.append(layer_opts)
        blocks.append(layer_blocks)
    info["tables_seconds"] = time.perf_counter() - t_tables

    n_weights = sum(m.weight.numel() for _, m in named)
    budget = _budget_bits(cfg, n_weights)
    t_alloc = time.perf_counter()
    choice = allocate(options, budget, solver=cfg.solver, n_weights=n_weights)
    info["allocation_seconds"] = time.perf_counter() - t_alloc

    layers = [
        LayerResult(name, _layer_kind(module), tuple(module.weight.shape), [cands[j]],
                    opts[j].loss, opts[j].cost // 8)
        for (name, module), opts, cands, j in zip(named, options, blocks, choice, strict=True)
    ]
    # The returned model holds packed integer weights (QuantizedLinear / QuantizedConv2d).
    qmodel = clone_fp32(model).to(dtype=_float_dtype(model))
    qmodel.train(model.training)
    replace_quantized_layers(qmodel, layers)
    total_bits = sum(opts[j].cost for opts, j in zip(options, choice, strict=True))
    code_bits = sum(storage_bits(b.n_weights, b.bits, 0) for x in layers for b in x.blocks)
    info["seconds"] = time.perf_counter() - t_start
    return QuantizationResult(
        model=qmodel, layers=layers, bits_per_weight=total_bits / n_weights,
        code_bits_per_weight=code_bits / n_weights, budget_bits=budget, info=info,
    )


def _dataset_len(loader) -> int | None:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
