r"""``quantize_model``: the pipeline, one stage after another.

1. **Layers** -- select the Linear/Conv2d layers (and Embedding layers with
   ``quantize_embeddings``; attention modules and transformers' ``Conv1D`` as the Linear layers
   they are, :mod:`~bayesq_lightning.attention`), refuse NaN/inf weights, resolve bit pins; a
   layer whose forward never runs on the first calibration batch is skipped.
2. **Calibration** -- the first ``calib_batches`` batches (not for ``rtn`` or ``mse``).
3. **Statistics** -- what the method needs (:mod:`~bayesq_lightning.methods`): a posterior
   (:func:`~bayesq_lightning.posterior.fit_posterior`) or GPTQ's input Hessians
   (:mod:`~bayesq_lightning.input_stats`).
4. **Blocks** -- each layer split into ``block_rows`` slices of output channels, one
   :class:`~bayesq_lightning.block_plan.BlockPlan` each.
5. **Candidates** -- for every allowed width and quantizer of every block: a grid or codebook
   (:mod:`~bayesq_lightning.quantizers`), codes by error feedback where the block has a rounding
   matrix (:mod:`~bayesq_lightning.rounding`), its loss ``D`` and exact cost ``C``
   (:func:`~bayesq_lightning.quantizers.storage_bits`); on a row sample for large blocks
   rounded by error feedback (:mod:`~bayesq_lightning.row_sample`).
6. **Allocation** -- the knapsack under ``bits * n_weights`` (or ``8 * budget_bytes``) stored
   bits, metadata included (:mod:`~bayesq_lightning.allocate`).
7. **Task-aware refinement** -- ``tables="mc"``: Monte-Carlo losses of the blocks nearest the
   allocation boundary (:mod:`~bayesq_lightning.tables`); ``tables="checked"``: measured
   substitution losses where the closed form is weakest (:mod:`~bayesq_lightning.checks`);
   then allocate again.
8. **Rounding** -- each row-sampled block's chosen width rounded on every row; for
   ``method="adaround"``, every chosen grid's codes learned layer by layer
   (:mod:`~bayesq_lightning.adaround`).
9. **Pack** -- packed ``QuantizedLinear`` / ``QuantizedConv2d`` layers in a copy of the model,
   or in the model itself with ``inplace=True``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .adaround import adaround_layers
from .allocate import Option, boundary_blocks
from .artifact import replace_quantized_layers
from .attention import (
    UNCALLED_REASON,
    equivalents_holding,
    linear_equivalent,
    own_unpacked_weights,
    swap_equivalents,
    swapped_weights,
    uncalled_layers,
)
from .batches import calibration_samples, clone_module
from .block_plan import (
    BlockPlan,
    add_candidates,
    allocate_plans,
    budget_bits,
    make_whole,
    plan_blocks,
    round_chosen,
)
from .checks import check_plans
from .config import BayesQConfig
from .coverage import coverage, matrix_weights
from .embeddings import (
    embedding_row_counts,
    floor_unseen_rows,
    row_weights,
    tied_input_matrix,
)
from .input_stats import layer_input_hessians
from .layers import (
    check_finite,
    check_pin_patterns,
    is_embedding,
    layer_kind,
    quantizable_layers,
    split_tied,
    unsupported_layers,
)
from .methods import METHODS_TABLE, Method
from .posterior import Posterior, Reduce, fit_posterior
from .posterior.marglik import known, stored
from .quantizers import storage_bits
from .result import LayerResult, QuantizationResult
from .rounding import FeedbackFactors
from .tables import mc_tables


@contextmanager
def _timed(info: dict, key: str) -> Iterator[None]:
    """The seconds a stage takes, into the run's ``info[key]``."""
    t0 = time.perf_counter()
    yield
    info[key] = time.perf_counter() - t0


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
    info: dict = {"method": cfg.method, "config": cfg.to_dict(), "tables": cfg.resolved_tables}

    user_model, model = model, linear_equivalent(model)  # attention / Conv1D as Linear layers
    named, pins, tied, skipped = _select_layers(model, cfg)                            # 1
    inventory = matrix_weights(model)  # before an in-place run replaces the layers
    batches, n_calib = _calibration(method, calibration_loader, cfg)                   # 2
    silent: set[str] = set()
    if batches:
        named, pins, tied, silent = _drop_uncalled(model, batches[0], named, pins, tied, skipped)
    counts = _embedding_counts(model, batches, named, tied, reduce)
    curv_batches, n_curv = _curvature_batches(method, cfg, curvature_loader, posterior,
                                              batches, n_calib, info)
    hessians = None
    if method.input_hessians:                                                          # 3
        with _timed(info, "hessian_seconds"):
            hessians = _input_hessians(model, batches, pins, tied, reduce, counts, silent)
        info["n_calib"] = n_calib
    posterior = _posterior(model, method, cfg, curv_batches, n_curv, list(pins), posterior,
                           n_data=n_data, reduce=reduce, loader=calibration_loader, info=info)

    n_weights = sum(m.weight.numel() for _, m in named)
    budget = budget_bits(cfg, n_weights)
    with _timed(info, "tables_seconds"):
        plans = plan_blocks(named, pins, cfg, posterior, hessians)                     # 4
        add_candidates(plans, method, cfg, progress)                                   # 5
    if counts:  # blocks with rows no calibration batch looks up
        info["embedding_floor"] = floor_unseen_rows(plans, counts, cfg.allowed_bits, budget,
                                                    n_weights)
    info["sampled_blocks"] = sum(p.sampled for p in plans)
    info["min_bits_per_weight"] = sum(min(o.cost for o in p.options) for p in plans) / n_weights
    with _timed(info, "allocation_seconds"):
        allocate_plans(plans, budget, cfg, n_weights)                                  # 6
    if cfg.resolved_tables == "mc":                                                    # 7
        with _timed(info, "mc_seconds"):
            _refine_mc(model, batches, posterior, plans, cfg, budget, n_weights, reduce,
                       progress, info)
    elif cfg.resolved_tables == "checked":
        with _timed(info, "check_seconds"):
            info.update(_check(model, batches, posterior, plans, method, cfg, budget, n_weights,
                               reduce, progress))
    with _timed(info, "rounding_seconds"):
        info["sample_overruled"] = round_chosen(plans, method, cfg, progress)          # 8
    if method.learns_rounding:
        with _timed(info, "adaround_seconds"):
            info["adaround"] = _learn_rounding(model, batches, plans, cfg, progress)

    layers = _layer_results(named, plans)
    total_bits = sum(p.options[p.choice].cost for p in plans)
    qmodel = _packed_model(user_model, named, layers, tied, inplace,                   # 9
                           total_bits / n_weights)
    if tied or skipped:
        info.update(tied=dict(tied), skipped=dict(skipped))
    code_bits = sum(storage_bits(b.n_weights, b.bits, 0) for x in layers for b in x.blocks)
    info["coverage"] = coverage(inventory, [x.name for x in layers], tied)
    info["seconds"] = time.perf_counter() - t_start
    return QuantizationResult(
        model=qmodel, layers=layers, bits_per_weight=total_bits / n_weights,
        code_bits_per_weight=code_bits / n_weights, budget_bits=budget, info=info,
        posterior=posterior, tied=dict(tied), skipped=dict(skipped),
    )


def _check(model: nn.Module, batches: list, posterior: Posterior, plans: list[BlockPlan],
           method: Method, cfg: BayesQConfig, budget: int, n_weights: int,
           reduce: Reduce | None, progress: bool) -> dict:
    """Stage 7 under ``tables="checked"`` (:mod:`~bayesq_lightning.checks`): its record."""
    factors = FeedbackFactors()  # rounding matrices of the blocks the checks round whole
    return check_plans(
        model, batches, plans, n_data=posterior.n_data, top_k=cfg.check_top_k,
        max_inputs=cfg.check_inputs, budget=cfg.check_budget, reduce=reduce, progress=progress,
        allocate=lambda ps: allocate_plans(ps, budget, cfg, n_weights),
        whole=lambda p, js: make_whole(p, js, method, cfg, factors))


def _curvature_batches(method: Method, cfg: BayesQConfig, loader: Iterable | None,
                       given: Posterior | None, batches: list, n_calib: int, info: dict
                       ) -> tuple[list, int]:
    """The batches the posterior's curvature is fitted on: ``curvature_loader``'s, or the
    calibration batches."""
    if loader is None:
        return batches, n_calib
    if given is not None:
        raise ValueError("curvature_loader feeds the posterior fit, which a given posterior "
                         "skips; pass one or the other")
    if method.posterior_structure(cfg) is None:
        raise ValueError(f"curvature_loader feeds the posterior fit, which method="
                         f"{cfg.method!r} does not do; drop it or use bayesq/hawq")
    info["curvature_data"] = "curvature_loader"
    return calibration_samples(loader, cfg.calib_batches, "curvature loader")


def _input_hessians(model: nn.Module, batches: list, pins: dict, tied: dict[str, str],
                    reduce: Reduce | None, counts: dict, silent: set[str]) -> dict:
    """GPTQ's ``X X^T / n`` per layer (an embedding's: its rows' shares of the lookups); a tied
    weight's error reaches the inputs of every use (``silent`` aliases never run)."""
    names = [n for n in [*pins, *tied] if n not in counts and n not in silent and not (
        tied.get(n) in counts and is_embedding(model.get_submodule(n)))]
    hessians = layer_input_hessians(model, batches, names, reduce=reduce)
    hessians.update({n: row_weights(c) for n, c in counts.items()})
    for alias, owner in tied.items():
        if alias in hessians:
            hessians[owner] = tied_input_matrix(hessians[owner], hessians.pop(alias))
    return hessians


def _embedding_counts(model: nn.Module, batches: list, named, tied: dict[str, str],
                      reduce: Reduce | None) -> dict:
    """The lookups per row of every selected embedding over the calibration batches, its
    embedding aliases' lookups added (none without calibration batches)."""
    owners = [n for n, m in named if is_embedding(m)]
    aliases = {a: o for a, o in tied.items()
               if o in owners and is_embedding(model.get_submodule(a))}
    if not owners or not batches:
        return {}
    counts = embedding_row_counts(model, batches, [*owners, *aliases], reduce)
    for alias, owner in aliases.items():
        counts[owner] += counts.pop(alias)
    return counts


def _refine_mc(model: nn.Module, batches: list, posterior: Posterior, plans: list[BlockPlan],
               cfg: BayesQConfig, budget: int, n_weights: int, reduce: Reduce | None,
               progress: bool, info: dict) -> None:
    """Stage 7: Monte-Carlo losses of the blocks nearest the allocation boundary (every block
    without ``mc_refine_top_k``) in place of their closed-form ones, then allocate again."""
    refine = list(range(len(plans)))
    if cfg.mc_refine_top_k is not None:
        refine = boundary_blocks([p.options for p in plans], [p.choice for p in plans],
                                 cfg.mc_refine_top_k)
    mc = mc_tables(
        model, batches, posterior, [(plans[i].layer, plans[i].rows) for i in refine],
        [plans[i].candidates for i in refine], n_data=posterior.n_data, samples=cfg.mc_samples,
        seed=cfg.seed, prior=cfg.score == "posterior_precision",
        temperature=cfg.posterior_temperature, reduce=reduce, progress=progress,
    )
    for i, losses in zip(refine, mc.losses, strict=True):
        plans[i].options = [Option(o.cost, max(loss, 0.0), o.bits, o.tag)
                            for o, loss in zip(plans[i].options, losses, strict=True)]
    allocate_plans(plans, budget, cfg, n_weights)
    info.update(mc_blocks=len(refine), mc_forward_passes=mc.forward_passes,
                mc_stderr={f"{plans[i].layer}[{plans[i].rows[0]}:{plans[i].rows[1]}]":
                           se[plans[i].choice] for i, se in zip(refine, mc.stderr, strict=True)})


def _learn_rounding(model: nn.Module, batches: list, plans: list[BlockPlan],
                    cfg: BayesQConfig, progress: bool) -> dict[str, dict]:
    """Stage 8 of AdaRound: the chosen grids' codes learned again, layer by layer (same
    grids, same cost); returns each layer's learning statistics."""
    per_layer = _plans_by_layer(plans)
    learned, stats = adaround_layers(
        model, batches, {name: [p.chosen for p in ps] for name, ps in per_layer.items()},
        cfg.adaround_iters, cfg.adaround_batch, cfg.seed, progress)
    for name, ps in per_layer.items():
        for plan, block in zip(ps, learned[name], strict=True):
            plan.candidates[plan.choice] = block
    return stats


def _packed_model(model: nn.Module, named, layers: list[LayerResult], tied: dict[str, str],
                  inplace: bool, bits_per_weight: float) -> nn.Module:
    """``model`` (``inplace``) or a copy of it with the packed layers swapped in; the copy keeps
    dtypes as they are (e.g. fp32 norms in a bf16 model) and does not copy the float weights
    of the layers it replaces. Attention modules and ``Conv1D`` layers holding a packed layer
    are swapped for their Linear equivalents first (:mod:`~bayesq_lightning.attention`)."""
    names = [n for n, _ in named]
    swapped = equivalents_holding(model, [*names, *tied])
    plain = [n for n in [*names, *tied]
             if not any(n == s or n.startswith(s + ".") for s in swapped)]
    qmodel = model if inplace else clone_module(model, [
        *_replaced_weights(model, [n for n in plain if n in names],
                           {a: o for a, o in tied.items() if a in plain}),
        *swapped_weights(model, swapped)])
    swap_equivalents(qmodel, swapped)
    if not inplace:
        own_unpacked_weights(qmodel, swapped, {*names, *tied})
    replace_quantized_layers(qmodel, layers, tied=tied, bits_per_weight=bits_per_weight)
    return qmodel


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
    named = quantizable_layers(model, cfg.include, cfg.exclude, cfg.quantize_embeddings)
    if any(name == "" for name, _ in named):
        raise ValueError("the model itself is a Linear/Conv2d layer and cannot be replaced in "
                         "place; wrap it in a parent module (e.g. nn.Sequential(layer))")
    named, tied, skipped = split_tied(model, named)
    skipped.update(unsupported_layers(model, cfg.include, cfg.exclude, cfg.quantize_embeddings))
    check_finite(named)
    return named, check_pin_patterns([name for name, _ in named], cfg), tied, skipped


def _drop_uncalled(model: nn.Module, batch, named, pins: dict, tied: dict[str, str],
                   skipped: dict[str, str]) -> tuple[list, dict, dict[str, str], set[str]]:
    """Stage 1, after the calibration batches are known: the layers whose forward never runs
    (a weight used functionally) moved to ``skipped``. A tied weight stays if any holder runs,
    owned by the first that does (T5's ``shared`` is looked up only through its aliases); the
    aliases that never run are returned (they have no input statistics)."""
    uncalled = set(uncalled_layers(model, batch, [*pins, *tied]))
    if not uncalled:
        return named, pins, tied, set()
    groups = {n: [n, *(a for a, o in tied.items() if o == n)] for n in pins}
    dropped = {n for n, group in groups.items() if uncalled.issuperset(group)}
    dropped |= {a for a, o in tied.items() if o in dropped}
    if len(dropped) == len(pins) + len(tied):
        raise ValueError(f"no selected layer runs its forward on the calibration batches "
                         f"({sorted(dropped)}): their weights are used functionally; nothing "
                         "to quantize")
    skipped.update({n: UNCALLED_REASON for n in sorted(dropped)})
    named = [(n, m) for n, m in named if n not in dropped]
    pins = {n: b for n, b in pins.items() if n not in dropped}
    tied = {a: o for a, o in tied.items() if a not in dropped}
    for owner in [n for n in pins if n in uncalled]:  # the first holder that runs owns it
        new = next(a for a in groups[owner][1:] if a not in uncalled)
        named = [(new, model.get_submodule(new)) if n == owner else (n, m) for n, m in named]
        pins = {new if n == owner else n: b for n, b in pins.items()}
        tied = {**{a: o for a, o in tied.items() if o != owner},
                **{a: new for a in groups[owner] if a != new}}
    return named, pins, tied, {a for a in tied if a in uncalled}


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
            # the number if solved already: K-FAC's is solved on the first read (the default
            # quantization never reads it; res.posterior.prior_precision does)
            structure=posterior.structure, prior_precision=known(stored(posterior)),
            n_data=posterior.n_data, n_calib=posterior.n_calib, backend=posterior.backend,
            labels=posterior.labels, posterior_seconds=posterior.seconds,
            posterior_reused=given is not None,
        )
    return posterior


def _layer_results(named, plans: list[BlockPlan]) -> list[LayerResult]:
    """Each layer's chosen blocks, expected loss and bytes."""
    per_layer = _plans_by_layer(plans)
    layers = []
    for name, module in named:
        chosen = [p.options[p.choice] for p in per_layer[name]]
        layers.append(LayerResult(
            name, layer_kind(module),
            tuple(module.weight.shape), [p.chosen for p in per_layer[name]],
            sum(o.loss for o in chosen), sum(o.cost for o in chosen) // 8,
        ))
    return layers


def _plans_by_layer(plans: list[BlockPlan]) -> dict[str, list[BlockPlan]]:
    """Each layer's block plans, in row order."""
    per_layer: dict[str, list[BlockPlan]] = {}
    for plan in plans:
        per_layer.setdefault(plan.layer, []).append(plan)
    return per_layer


def _dataset_len(loader) -> int | None:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None

