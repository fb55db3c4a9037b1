r"""``quantize_model``: the pipeline, one stage after another.

1. **Layers** -- select the Linear/Conv2d layers, refuse NaN/inf weights, resolve bit pins.
2. **Calibration** -- the first ``calib_batches`` batches (not for ``rtn``).
3. **Statistics** -- what the method needs (:mod:`~bayesq_lightning.methods`): a posterior
   (:func:`~bayesq_lightning.posterior.fit_posterior`) or GPTQ's input Hessians.
4. **Blocks** -- each layer split into ``block_rows`` slices of output channels.
5. **Candidates and tables** -- one block at a time, its design weights, score and rounding
   matrix from the method's record; for every allowed width and quantizer: a grid or codebook
   (:mod:`~bayesq_lightning.quantizers`), codes by error feedback where the block has a rounding
   matrix (:mod:`~bayesq_lightning.rounding`), its score ``D`` and exact cost ``C``
   (:func:`~bayesq_lightning.quantizers.storage_bits`). A feedback block with more than
   ``2 * score_rows`` rows does this on a row sample, its ``D`` an estimate
   (:mod:`~bayesq_lightning.row_sample`).
6. **Allocation** -- the knapsack under ``bits * n_weights`` (or ``8 * budget_bytes``) stored
   bits, metadata included (:mod:`~bayesq_lightning.allocate`); then each row-sampled block's
   chosen width designed and rounded on every row, its grids compared by their exact scores.
7. **Monte-Carlo refinement** (``tables="mc"``) -- task-aware scores of the blocks nearest the
   allocation boundary (:mod:`~bayesq_lightning.tables`), then allocate again.
8. **Pack** -- packed ``QuantizedLinear`` / ``QuantizedConv2d`` layers in a copy of the model,
   or in the model itself with ``inplace=True``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .allocate import InfeasibleBudgetError, Option, allocate, boundary_blocks
from .artifact.modules import replace_quantized_layers
from .batches import calibration_samples, clone_module
from .config import BayesQConfig
from .hf import attach_hf_config
from .input_stats import layer_input_hessians
from .layers import (
    check_finite,
    check_pin_patterns,
    quantizable_layers,
    split_tied,
    unsupported_layers,
)
from .methods import METHODS_TABLE, BlockContext, Method
from .posterior import Posterior, Reduce, clear_score_cache, fit_posterior
from .progress import progress as show_progress
from .quantizers import (
    block_storage_bits,
    dequantize,
    design_nonuniform,
    design_uniform,
    storage_bits,
)
from .result import BlockResult, LayerResult, QuantizationResult
from .rounding import feedback_round_blocks
from .row_sample import full_block_bits, sample_rows
from .tables import mc_tables


@dataclass
class Block:
    """One allocation unit: rows ``rows`` of layer ``layer`` and what its method gives it.

    The method's inputs (the fields after ``ctx``) are formed by :func:`_with_inputs` when the
    block's candidates are, one block at a time: held for every block at once, the precision
    and design weights would be two weight-sized fp32 copies of the model (BERT-base: 0.7 GB).
    """

    layer: str
    rows: tuple[int, int]
    w: torch.Tensor  # (rows, cols) fp32 weights (posterior mean)
    bits: tuple[int, ...]  # allowed widths after the per-layer pins
    layer_rows: int
    ctx: BlockContext
    precision: torch.Tensor | None = None  # posterior precision of the design; None: min-max
    score: object = None  # dW -> float
    H: torch.Tensor | None = None  # input-side matrix of error-feedback rounding
    weight: torch.Tensor | None = None  # design importance per weight; None: the precision
    row_form: tuple | None = None  # row scales, (dW of rows idx, idx) -> row terms of score


def _with_inputs(block: Block, method: Method) -> Block:
    """``block`` with its method's inputs (a copy, dropped after its candidates)."""
    inputs = method.block(block.ctx)
    return dataclasses.replace(block, precision=inputs.precision, score=inputs.score,
                               H=inputs.H, weight=inputs.weight,
                               row_form=inputs.row_form)


def _rows_of(block: Block, idx: torch.Tensor) -> Block:
    """The sub-block of ``block``'s rows ``idx`` (block-relative), for its candidates' design
    and rounding; its ``rows`` keep the block's start (the rounding reads them, not the
    layer's weights)."""
    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[idx]

    r0 = block.rows[0]
    return dataclasses.replace(block, rows=(r0, r0 + len(idx)), w=block.w[idx],
                               precision=pick(block.precision), weight=pick(block.weight))


def quantize_model(
    model: nn.Module,
    calibration_loader: Iterable | None,
    config: BayesQConfig | None = None,
    *,
    n_data: int | None = None,
    reduce: Reduce | None = None,
    progress: bool = True,
    posterior: Posterior | None = None,
    inplace: bool = False,
    curvature_loader: Iterable | None = None,
) -> QuantizationResult:
    """Quantize the Linear/Conv2d weights of ``model`` to a mixed-precision budget.

    Parameters
    ----------
    model : nn.Module
        Trained model; left untouched (all work happens on copies) unless ``inplace``.
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
        Show progress bars (drawn only when standard error is a terminal).
    posterior : Posterior, optional
        A posterior fitted earlier on this model (e.g. ``result.posterior`` of a run at another
        budget) to reuse instead of fitting again; its structure must match the config.
    inplace : bool
        Swap the packed layers into ``model`` itself (the callback does) instead of a copy;
        nothing is swapped if any stage fails.
    curvature_loader : iterable of batches, optional
        Batches the posterior's curvature is estimated on (its first ``calib_batches``), e.g. a
        hold-out split the model was not trained on: on its own training samples a model that
        fits them has almost no curvature. Default: the calibration batches. GPTQ's input
        statistics and the Monte-Carlo tables always use the calibration batches.

    Returns
    -------
    QuantizationResult
        ``result.model`` holds packed ``QuantizedLinear`` / ``QuantizedConv2d`` layers.
    """
    cfg = config or BayesQConfig()
    method = METHODS_TABLE[cfg.method]
    t_start = time.perf_counter()
    info: dict = {"method": cfg.method, "config": cfg.to_dict()}

    named, pins, tied, skipped = _select_layers(model, cfg)                            # 1
    batches, n_calib = _calibration(method, calibration_loader, cfg)                   # 2
    curv_batches, n_curv = batches, n_calib
    if curvature_loader is not None:
        if posterior is not None:
            raise ValueError("curvature_loader feeds the posterior fit, which a given posterior "
                             "skips; pass one or the other")
        if method.posterior_structure(cfg) is None:
            raise ValueError(f"curvature_loader feeds the posterior fit, which method="
                             f"{cfg.method!r} does not do; drop it or use bayesq/hawq")
        curv_batches, n_curv = calibration_samples(curvature_loader, cfg.calib_batches,
                                                   "curvature loader")
        info["curvature_data"] = "curvature_loader"
    hessians = None
    if method.input_hessians:                                                          # 3
        t_h = time.perf_counter()
        hessians = layer_input_hessians(model, batches, [*pins, *tied], reduce=reduce)
        for alias, owner in tied.items():  # a shared weight's error reaches both uses' inputs
            hessians[owner] = hessians[owner] + hessians.pop(alias)
        info.update(n_calib=n_calib, hessian_seconds=time.perf_counter() - t_h)
    posterior = _posterior(model, method, cfg, curv_batches, n_curv, list(pins), posterior,
                           n_data=n_data, reduce=reduce, loader=calibration_loader, info=info)

    t_tables = time.perf_counter()
    blocks = _blocks(named, pins, cfg, method, posterior, hessians)                    # 4
    options, candidates, pending = _candidates(blocks, method, cfg, progress)          # 5
    info["tables_seconds"] = time.perf_counter() - t_tables
    info["sampled_blocks"] = sum(specs is not None for specs in pending)

    n_weights = sum(m.weight.numel() for _, m in named)
    budget = _budget_bits(cfg, n_weights)
    info["min_bits_per_weight"] = sum(min(o.cost for o in opts) for opts in options) / n_weights
    t_alloc = time.perf_counter()
    choice = _allocate(options, budget, cfg, n_weights)                                # 6
    info["allocation_seconds"] = time.perf_counter() - t_alloc

    if cfg.tables == "mc":                                                             # 7
        t_mc = time.perf_counter()
        refine = list(range(len(blocks)))
        if cfg.mc_refine_top_k is not None:
            refine = boundary_blocks(options, choice, cfg.mc_refine_top_k)
        mc = mc_tables(
            model, batches, posterior, [(blocks[i].layer, blocks[i].rows) for i in refine],
            [candidates[i] for i in refine], n_data=posterior.n_data, samples=cfg.mc_samples,
            seed=cfg.seed, prior=cfg.score == "posterior_precision",
            temperature=cfg.posterior_temperature, reduce=reduce, progress=progress,
        )
        for i, losses in zip(refine, mc.losses, strict=True):
            options[i] = [Option(o.cost, max(loss, 0.0), o.bits, o.tag)
                          for o, loss in zip(options[i], losses, strict=True)]
        choice = _allocate(options, budget, cfg, n_weights)
        info.update(mc_blocks=len(refine), mc_forward_passes=mc.forward_passes,
                    mc_seconds=time.perf_counter() - t_mc,
                    mc_stderr={f"{blocks[i].layer}[{blocks[i].rows[0]}:{blocks[i].rows[1]}]":
                               se[choice[i]] for i, se in zip(refine, mc.stderr, strict=True)})

    t_round = time.perf_counter()
    info["sample_overruled"] = _round_chosen(blocks, method, cfg, options, candidates, pending,
                                             choice, progress)
    info["rounding_seconds"] = time.perf_counter() - t_round

    layers = _layer_results(named, blocks, options, candidates, choice)
    # dtypes kept as they are (e.g. fp32 norms in a bf16 model); the float weights of the
    # layers replaced next are not copied (BERT-base: 0.34 GB less at the peak)
    qmodel = model if inplace else clone_module(                                       # 8
        model, _replaced_weights(model, [n for n, _ in named], tied))
    replace_quantized_layers(qmodel, layers, tied=tied)
    if tied or skipped:
        info.update(tied=dict(tied), skipped=dict(skipped))
    total_bits = sum(opts[j].cost for opts, j in zip(options, choice, strict=True))
    attach_hf_config(qmodel, [x.name for x in layers], tied,  # save_pretrained-ready
                     {"bits_per_weight": total_bits / n_weights})
    code_bits = sum(storage_bits(b.n_weights, b.bits, 0) for x in layers for b in x.blocks)
    info["seconds"] = time.perf_counter() - t_start
    return QuantizationResult(
        model=qmodel, layers=layers, bits_per_weight=total_bits / n_weights,
        code_bits_per_weight=code_bits / n_weights, budget_bits=budget, info=info,
        posterior=posterior, tied=dict(tied), skipped=dict(skipped),
    )


def _replaced_weights(model: nn.Module, names: list[str], tied: dict[str, str]
                      ) -> list[nn.Parameter]:
    """The weights of the layers ``names`` and ``tied`` aliases that no other module holds (as a
    parameter or a buffer): a copy of ``model`` whose layers are replaced at once can read these
    from ``model``."""
    replaced = {id(model.get_submodule(n)) for n in [*names, *tied]}
    kept = {id(t) for m in model.modules() if id(m) not in replaced
            for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
    return [m.weight for m in map(model.get_submodule, names) if id(m.weight) not in kept]


# --------------------------------------------------------------------------- stages


def _select_layers(model: nn.Module, cfg: BayesQConfig
                   ) -> tuple[list[tuple[str, nn.Module]], dict[str, tuple[int, ...]],
                              dict[str, str], dict[str, str]]:
    """Stage 1: the quantized layers, their allowed widths, tied aliases and skipped layers;
    every check before any work."""
    named = quantizable_layers(model, cfg.include, cfg.exclude)
    if any(name == "" for name, _ in named):
        raise ValueError("the model itself is a Linear/Conv2d layer and cannot be replaced in "
                         "place; wrap it in a parent module (e.g. nn.Sequential(layer))")
    named, tied, skipped = split_tied(model, named)
    skipped.update(unsupported_layers(model, cfg.include, cfg.exclude))
    check_finite(named)
    return named, check_pin_patterns([name for name, _ in named], cfg), tied, skipped


def _calibration(method: Method, loader: Iterable | None, cfg: BayesQConfig
                 ) -> tuple[list, int]:
    """Stage 2: the calibration batches the method reads, and their sample count."""
    if not method.needs_calibration:
        return [], 0
    if loader is None:
        raise ValueError(f"method={cfg.method!r} needs a calibration loader "
                         "(method='rtn' does not)")
    return calibration_samples(loader, cfg.calib_batches)


def _posterior(model: nn.Module, method: Method, cfg: BayesQConfig, batches: list, n_calib: int,
               names: list[str], given: Posterior | None, *, n_data: int | None,
               reduce: Reduce | None, loader, info: dict) -> Posterior | None:
    """Stage 3: the posterior the method scores with (fitted, or ``given`` and checked)."""
    wanted = method.posterior_structure(cfg)
    if given is not None and (wanted is None or given.structure != wanted
                              or set(given.layers) != set(names)):
        raise ValueError(
            f"the given posterior ({given.structure}, layers {sorted(given.layers)}) does "
            f"not match this run (method {cfg.method!r}, {wanted or 'no posterior'}, layers "
            f"{sorted(names)}); fit it with the same structure and layer selection, or pass "
            "posterior=None"
        )
    if given is not None:
        modules = dict(model.named_modules())
        wrong = [n for n in names if tuple(given.layers[n].mean.shape)
                 != tuple(modules[n].weight.shape)]
        if wrong:
            raise ValueError(f"the given posterior's layers {wrong} have other shapes than this "
                             "model's; it was fitted on another model: pass posterior=None")
    posterior = given
    if wanted is not None and posterior is None:
        if reduce is not None:  # the fallback must be the global count, as in the fit
            n_calib = int(reduce(torch.tensor(float(n_calib))).item())
        n_data = n_data or cfg.n_data or _dataset_len(loader) or n_calib
        posterior = fit_posterior(
            model, batches, names, n_data=n_data, prior_precision=cfg.prior_precision,
            backend=cfg.backend, reduce=reduce, structure=wanted,
            rank=cfg.rank if wanted == "lowrank" else None, kfac_batches=cfg.kfac_batches,
        )
    if posterior is not None:
        info.update(
            structure=posterior.structure, prior_precision=posterior.prior_precision,
            n_data=posterior.n_data, n_calib=posterior.n_calib, backend=posterior.backend,
            labels=posterior.labels, posterior_seconds=posterior.seconds,
            posterior_reused=given is not None,
        )
    return posterior


def _blocks(named, pins: dict[str, tuple[int, ...]], cfg: BayesQConfig, method: Method,
            posterior: Posterior | None, hessians: dict | None) -> list[Block]:
    """Stage 4: every layer split into allocation blocks (their method inputs come in stage 5)."""
    blocks = []
    for name, module in named:
        w = module.weight.detach().float().reshape(module.weight.shape[0], -1).cpu()
        step = cfg.block_rows or w.shape[0]
        for r0 in range(0, w.shape[0], step):
            rows = (r0, min(r0 + step, w.shape[0]))
            ctx = BlockContext(name, w, rows,
                               None if posterior is None else posterior.layers[name],
                               None if hessians is None else hessians[name], cfg.score)
            blocks.append(Block(name, rows, w[rows[0]:rows[1]], pins[name], w.shape[0], ctx))
    return blocks


Spec = tuple[int, str, str]  # a candidate: (bits, quantizer, design objective)


def _candidates(blocks: list[Block], method: Method, cfg: BayesQConfig, progress: bool
                ) -> tuple[list[list[Option]], list[list[BlockResult]], list[list[Spec] | None]]:
    """Stage 5: every block's method inputs, candidates (width x quantizer) and (cost, score)
    options, one block at a time.

    A block that :func:`_score_sample` samples gets its candidates on a row sample only (their
    options' costs are the whole block's, their scores estimates; ``row_sample``); its entry in
    the returned specs lists what each candidate is, for :func:`_round_chosen`.
    """
    quantizers = ("uniform", "nonuniform") if cfg.quantizer == "auto" else (cfg.quantizer,)
    options, candidates, pending = [], [], []
    for b, lean in enumerate(show_progress(blocks, progress, "bayesq candidates")):
        block = _with_inputs(lean, method)
        objectives = method.design_objectives(cfg, feedback=block.H is not None)
        specs = [(bits, quantizer, objective)
                 for bits in block.bits for quantizer in quantizers for objective in objectives]
        sample = _score_sample(block, len(specs), cfg, b)
        part = block if sample is None else _rows_of(block, sample[0])
        cands = [_design(part, *spec, cfg) for spec in specs]
        if block.H is not None:  # gptq, bayesq-kron: error feedback, every candidate in one pass
            cands = feedback_round_blocks(cands, part.w, part.H, part.layer_rows, cfg.damp,
                                          cfg.act_order)
        if sample is None:
            options.append([Option(block_storage_bits(c), candidate_loss(block, c), c.bits,
                                   c.quantizer) for c in cands])
        else:
            (idx, weight), n_rows = sample, block.rows[1] - block.rows[0]
            terms = block.row_form[1]
            options.append([Option(full_block_bits(c, n_rows), float((weight * terms(
                dequantize(c, torch.float64) - part.w.double(), idx)).sum()), c.bits,
                c.quantizer) for c in cands])
        candidates.append(cands)
        pending.append(None if sample is None else specs)
    clear_score_cache()
    return options, candidates, pending


def _score_sample(block: Block, n_candidates: int, cfg: BayesQConfig, index: int
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rows ``block`` compares its candidates on and their estimate weights
    (:func:`~bayesq_lightning.row_sample.sample_rows`: ``cfg.score_rows`` draws, seeded per
    block), or ``None``: every row (no feedback, one candidate, at most ``2 * score_rows``
    rows, or Monte-Carlo tables, which need every candidate whole)."""
    n_rows = block.rows[1] - block.rows[0]
    if (cfg.score_rows is None or block.row_form is None or n_candidates < 2
            or n_rows <= 2 * cfg.score_rows or cfg.tables == "mc"):
        return None
    w = block.w.double()  # a row's rounding error scales with its range
    return sample_rows(block.row_form[0] * (w.amax(1) - w.amin(1)) ** 2, cfg.score_rows,
                       cfg.seed * 1_000_003 + index)


def _round_chosen(blocks: list[Block], method: Method, cfg: BayesQConfig,
                  options: list[list[Option]], candidates: list[list[BlockResult]],
                  pending: list[list[Spec] | None], choice: list[int], progress: bool) -> int:
    """Stage 6b: every row-sampled block's chosen width and quantizer designed and rounded on
    all its rows, each of its grid designs (same cost), and the one with the lower exact score
    stored (in place of the sample's candidate and estimate).

    The grids are compared exactly because the sample's estimate leaves out K-FAC's cross-row
    terms, which are what a clipped grid's errors can add (:mod:`~bayesq_lightning.row_sample`).
    """
    todo = [b for b, specs in enumerate(pending) if specs is not None]
    overruled = 0
    for b in show_progress(todo, progress, "bayesq rounding"):
        block, (bits, quantizer, _) = _with_inputs(blocks[b], method), pending[b][choice[b]]
        at = [j for j, spec in enumerate(pending[b]) if spec[:2] == (bits, quantizer)]
        finals = feedback_round_blocks([_design(block, *pending[b][j], cfg) for j in at],
                                       block.w, block.H, block.layer_rows, cfg.damp,
                                       cfg.act_order)
        losses = [candidate_loss(block, c) for c in finals]
        k = min(range(len(at)), key=losses.__getitem__)
        cost = block_storage_bits(finals[k])
        if cost != options[b][choice[b]].cost:  # the allocation's accounting is the artifact's
            raise RuntimeError(f"block {b} of {block.layer!r}: the sampled candidate was costed "
                               f"{options[b][choice[b]].cost} bits, the whole one holds {cost}")
        overruled += losses[k] < losses[at.index(choice[b])]  # not a tie
        choice[b] = at[k]
        options[b][at[k]] = Option(cost, losses[k], bits, quantizer)
        candidates[b][at[k]] = finals[k]
    clear_score_cache()
    return overruled


def _design(block: Block, bits: int, quantizer: str, objective: str,
            cfg: BayesQConfig) -> BlockResult:
    """The candidate grid or codebook of ``block`` at ``bits``.

    ``objective`` is ``"minmax"`` (no clipping search; plain k-means codebooks), ``"deployed"``
    or ``"expected"``. The mean's nearest codes are only computed where no error feedback
    replaces them.
    """
    round_mean = block.H is None
    precision = block.precision
    if objective == "minmax":  # the weights' own range, no clipping search
        precision, objective = None, "deployed"
    if quantizer == "uniform":
        grid = design_uniform(block.w, bits, precision=precision,
                              group_size=cfg.group_size, range_objective=objective,
                              round_mean=round_mean, weight=block.weight)
        return BlockResult(block.rows, bits, "uniform", cfg.group_size, grid.codes,
                           grid.scale, grid.zero)
    grid = design_nonuniform(block.w, bits, precision=precision,
                             per_row=cfg.per_row_codebook, range_objective=objective,
                             round_mean=round_mean, weight=block.weight)
    return BlockResult(block.rows, bits, "nonuniform", None, grid.codes, codebook=grid.codebook)


def candidate_loss(block: Block, candidate: BlockResult) -> float:
    """The block's score of the stored weights' error from the mean."""
    return block.score(dequantize(candidate, torch.float64) - block.w.double())


def _budget_bits(cfg: BayesQConfig, n_weights: int) -> int:
    if cfg.budget_bytes is not None:
        return 8 * cfg.budget_bytes
    return math.floor(cfg.bits * n_weights + 1e-9)


def _allocate(options, budget: int, cfg: BayesQConfig, n_weights: int) -> list[int]:
    """Stage 6: :func:`allocate`, with an infeasible ``budget_bytes`` stated in bytes."""
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
            name, "conv2d" if isinstance(module, nn.Conv2d) else "linear",
            tuple(module.weight.shape), [candidates[i][choice[i]] for i in idx],
            sum(o.loss for o in chosen), sum(o.cost for o in chosen) // 8,
        ))
    return layers


def _dataset_len(loader) -> int | None:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None

