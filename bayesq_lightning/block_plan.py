r"""One allocation block's life, and the pipeline's steps over a list of them.

A :class:`BlockPlan` is rows ``r0:r1`` of one layer. Its life is the pipeline's stages 4-6
(:mod:`~bayesq_lightning.quantize`):

1. :func:`plan_blocks` -- the block, its allowed widths and what its method reads
   (:class:`~bayesq_lightning.methods.BlockContext`);
2. :func:`add_candidates` -- its method's inputs (:class:`~bayesq_lightning.methods.BlockInputs`:
   precision, design weights, loss, rounding matrix), formed while its candidates are and then
   dropped (held for every block at once they would be two weight-sized fp32 copies of the
   model); for every allowed width x quantizer x range objective a candidate grid or codebook,
   its codes (by error feedback where the block has a rounding matrix), and its option
   ``(cost C, loss D)`` for the knapsack. A block rounded by error feedback with more than
   ``2 * score_rows`` rows does this on a row sample (:mod:`~bayesq_lightning.row_sample`):
   ``C`` exact, ``D`` an estimate;
3. the knapsack sets :attr:`BlockPlan.choice` (:func:`allocate_plans`);
4. :func:`round_chosen` -- a sampled block's chosen width designed and rounded on every row,
   its grids compared by their exact losses.

Each step holds what it caches (the loss's factors, the rounding's factorisation) in objects
it drops when it returns: nothing of a run stays referenced once the result is built.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .allocate import InfeasibleBudgetError, Option, allocate
from .config import BayesQConfig
from .methods import BlockContext, BlockInputs, Method
from .posterior import Posterior
from .progress import progress as show_progress
from .quantizers import block_storage_bits, dequantize, design_nonuniform, design_uniform
from .result import BlockResult
from .rounding import FeedbackFactors, feedback_round_blocks
from .row_sample import full_block_bits, sample_rows


@dataclass(frozen=True)
class Spec:
    """What a candidate is: its width, quantizer and range objective."""

    bits: int
    quantizer: str
    range_objective: str


@dataclass(eq=False)
class BlockPlan:
    """One allocation block from its inputs to its rounded codes.

    Attributes
    ----------
    context : BlockContext
        The layer, the rows and the statistics the block's method reads.
    bits : tuple of int
        The widths the block may take (after the per-layer pins).
    inputs : BlockInputs or None
        The method's inputs; present only inside :meth:`open`.
    specs, candidates, options : list
        Aligned per candidate: what it is, its grid and codes, its ``(cost, loss)``.
    sampled : bool
        The candidates were designed and rounded on a row sample (their losses estimates).
    whole : set of int
        Of a sampled block, the candidates since rounded on every row (:func:`make_whole`).
    choice : int or None
        The knapsack's pick among the candidates.
    """

    context: BlockContext
    bits: tuple[int, ...]
    inputs: BlockInputs | None = None
    specs: list[Spec] = field(default_factory=list)
    candidates: list[BlockResult] = field(default_factory=list)
    options: list[Option] = field(default_factory=list)
    sampled: bool = False
    whole: set[int] = field(default_factory=set)
    choice: int | None = None

    @property
    def layer(self) -> str:
        return self.context.layer

    @property
    def rows(self) -> tuple[int, int]:
        return self.context.rows

    @property
    def layer_rows(self) -> int:
        return self.context.w.shape[0]

    @property
    def w(self) -> Tensor:
        """The block's weights (posterior mean), ``(rows, cols)`` fp32 on the CPU."""
        return self.context.w[self.rows[0]:self.rows[1]]

    @property
    def chosen(self) -> BlockResult:
        return self.candidates[self.choice]

    @contextmanager
    def open(self, method: Method) -> Iterator[BlockInputs]:
        """The method's inputs for this block, dropped (with what their loss caches) on exit."""
        self.inputs = method.block(self.context)
        try:
            yield self.inputs
        finally:
            self.inputs = None

    def same_width(self) -> list[int]:
        """The candidates of the chosen width and quantizer: the grids the choice is among."""
        picked = self.options[self.choice]
        return [j for j, o in enumerate(self.options) if (o.bits, o.tag) == (picked.bits, picked.tag)]

    def loss(self, candidate: BlockResult) -> float:
        """The block's loss of a candidate's stored weights' error from the mean."""
        return self.inputs.loss(dequantize(candidate, torch.float64) - self.w.double())


@dataclass(frozen=True)
class Rows:
    """The rows a block's candidates are designed and rounded on: all of them, or a sample."""

    rows: tuple[int, int]  # layer rows; a sample keeps the block's start (rounding reads it)
    w: Tensor
    precision: Tensor | None
    weight: Tensor | None


def plan_blocks(named, pins: dict[str, tuple[int, ...]], cfg: BayesQConfig,
                posterior: Posterior | None, hessians: dict | None) -> list[BlockPlan]:
    """Every layer split into ``cfg.block_rows`` rows per block (one block per layer: ``None``)."""
    plans = []
    for name, module in named:
        w = module.weight.detach().float().reshape(module.weight.shape[0], -1).cpu()
        step = cfg.block_rows or w.shape[0]
        for r0 in range(0, w.shape[0], step):
            context = BlockContext(name, w, (r0, min(r0 + step, w.shape[0])),
                                   None if posterior is None else posterior.layers[name],
                                   None if hessians is None else hessians[name],
                                   with_prior=cfg.score == "posterior_precision",
                                   design_precision=cfg.range_objective == "expected")
            plans.append(BlockPlan(context, pins[name]))
    return plans


def add_candidates(plans: list[BlockPlan], method: Method, cfg: BayesQConfig,
                   progress: bool) -> None:
    """Every block's candidates and options, one block at a time (its inputs open meanwhile)."""
    quantizers = ("uniform", "nonuniform") if cfg.quantizer == "auto" else (cfg.quantizer,)
    factors = FeedbackFactors()  # a layer's blocks share its rounding matrix
    for index, plan in enumerate(show_progress(plans, progress, "bayesq candidates")):
        with plan.open(method) as inputs:
            objectives = method.range_objectives(cfg, feedback=inputs.H is not None)
            plan.specs = [Spec(bits, quantizer, objective) for bits in plan.bits
                          for quantizer in quantizers for objective in objectives]
            sample = _score_sample(plan, cfg, index)
            design_rows = _all_rows(plan) if sample is None else _sampled_rows(plan, sample[0])
            plan.candidates = _rounded(plan, design_rows, plan.specs, cfg, factors)
            plan.sampled = sample is not None
            if sample is None:
                plan.options = [Option(block_storage_bits(c), plan.loss(c), c.bits, c.quantizer)
                                for c in plan.candidates]
            else:
                plan.options = _estimated_options(plan, design_rows, sample)


def _rounded(plan: BlockPlan, design_rows: Rows, specs: list[Spec], cfg: BayesQConfig,
             factors: FeedbackFactors) -> list[BlockResult]:
    """The candidates ``specs`` designed on ``design_rows``, re-rounded by error feedback where the
    block has a rounding matrix (every candidate in one stacked pass)."""
    H = plan.inputs.H
    candidates = [_design(design_rows, spec, cfg, round_mean=H is None) for spec in specs]
    if H is None:
        return candidates
    return feedback_round_blocks(candidates, design_rows.w, H, plan.layer_rows, cfg.damp,
                                 cfg.act_order, factors=factors, layer=plan.layer)


def _estimated_options(plan: BlockPlan, design_rows: Rows, sample: tuple[Tensor, Tensor]
                       ) -> list[Option]:
    """Options of candidates designed on a row sample: the whole block's exact cost, and the
    Hansen-Hurwitz estimate of its loss's row terms."""
    (idx, weight), n_rows = sample, plan.rows[1] - plan.rows[0]
    terms = plan.inputs.row_terms.terms
    return [Option(full_block_bits(c, n_rows),
                   float((weight * terms(dequantize(c, torch.float64) - design_rows.w.double(),
                                         idx)).sum()), c.bits, c.quantizer)
            for c in plan.candidates]


def _score_sample(plan: BlockPlan, cfg: BayesQConfig, index: int
                  ) -> tuple[Tensor, Tensor] | None:
    """The rows ``plan`` compares its candidates on and their estimate weights
    (:func:`~bayesq_lightning.row_sample.sample_rows`: ``cfg.score_rows`` draws, seeded per
    block), or ``None``: every row (no feedback, one candidate, at most ``2 * score_rows``
    rows, or Monte-Carlo tables, which need every candidate whole; the checks round the
    candidates they measure whole, :func:`make_whole`)."""
    n_rows = plan.rows[1] - plan.rows[0]
    row_terms = plan.inputs.row_terms
    if (cfg.score_rows is None or row_terms is None or len(plan.specs) < 2
            or n_rows <= 2 * cfg.score_rows or cfg.resolved_tables == "mc"):
        return None
    w = plan.w.double()  # a row's rounding error scales with its range
    return sample_rows(row_terms.scales * (w.amax(1) - w.amin(1)) ** 2, cfg.score_rows,
                       cfg.seed * 1_000_003 + index)


def _all_rows(plan: BlockPlan) -> Rows:
    return Rows(plan.rows, plan.w, plan.inputs.precision, plan.inputs.weight)


def _sampled_rows(plan: BlockPlan, idx: Tensor) -> Rows:
    """The block's rows ``idx`` (block-relative) as rows of their own."""
    def pick(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[idx]

    r0 = plan.rows[0]
    return Rows((r0, r0 + len(idx)), plan.w[idx], pick(plan.inputs.precision),
                pick(plan.inputs.weight))


def make_whole(plan: BlockPlan, indices: list[int], method: Method, cfg: BayesQConfig,
               factors: FeedbackFactors) -> None:
    """The candidates ``indices`` of a row-sampled ``plan`` designed and rounded on every row,
    in place of the sample's, with their exact costs and losses."""
    todo = [j for j in indices if j not in plan.whole]
    if not todo:
        return
    with plan.open(method):
        whole = _rounded(plan, _all_rows(plan), [plan.specs[j] for j in todo], cfg, factors)
        losses = [plan.loss(c) for c in whole]
    for j, c, loss in zip(todo, whole, losses, strict=True):
        cost = block_storage_bits(c)
        if cost != plan.options[j].cost:  # the allocation's accounting is the artifact's
            raise RuntimeError(f"block {plan.rows} of {plan.layer!r}: the sampled candidate was "
                               f"costed {plan.options[j].cost} bits, the whole one holds {cost}")
        plan.candidates[j] = c
        plan.options[j] = Option(cost, loss, plan.options[j].bits, plan.options[j].tag)
    plan.whole.update(todo)


def round_chosen(plans: list[BlockPlan], method: Method, cfg: BayesQConfig,
                 progress: bool) -> int:
    """Every row-sampled block's chosen width and quantizer designed and rounded on all its
    rows, each of its range objectives (same cost), and the one with the lower exact loss
    stored in place of the sample's candidate and estimate. Returns how many blocks the exact
    comparison overruled (kept another objective than the estimate preferred). Blocks whose
    chosen candidate is already whole (the checks measured it) keep it.

    The grids are compared exactly because the sample's estimate leaves out K-FAC's cross-row
    terms, which are what a clipped grid's errors can add (:mod:`~bayesq_lightning.row_sample`).
    """
    overruled = 0
    factors = FeedbackFactors()
    todo = [p for p in plans if p.sampled and p.choice not in p.whole]
    for plan in show_progress(todo, progress, "bayesq rounding"):
        same_width = plan.same_width()
        make_whole(plan, same_width, method, cfg, factors)
        losses = [plan.options[j].loss for j in same_width]
        k = min(range(len(same_width)), key=losses.__getitem__)
        overruled += losses[k] < losses[same_width.index(plan.choice)]  # not a tie
        plan.choice = same_width[k]
    return overruled


def _design(design_rows: Rows, spec: Spec, cfg: BayesQConfig, round_mean: bool) -> BlockResult:
    """The candidate grid or codebook of ``design_rows`` at ``spec``.

    ``"minmax"`` keeps the weights' own range (no clipping search; plain k-means codebooks).
    The mean's nearest codes are only computed where no error feedback (``round_mean=False``)
    replaces them.
    """
    precision, objective = design_rows.precision, spec.range_objective
    if objective == "minmax":
        precision, objective = None, "deployed"
    if spec.quantizer == "uniform":
        grid = design_uniform(design_rows.w, spec.bits, precision=precision,
                              group_size=cfg.group_size, range_objective=objective,
                              round_mean=round_mean, weight=design_rows.weight)
        return BlockResult(design_rows.rows, spec.bits, "uniform", cfg.group_size, grid.codes,
                           grid.scale, grid.zero)
    grid = design_nonuniform(design_rows.w, spec.bits, precision=precision,
                             per_row=cfg.per_row_codebook, range_objective=objective,
                             round_mean=round_mean, weight=design_rows.weight)
    return BlockResult(design_rows.rows, spec.bits, "nonuniform", None, grid.codes,
                       codebook=grid.codebook)


def budget_bits(cfg: BayesQConfig, n_weights: int) -> int:
    """The budget in stored bits: ``8 * budget_bytes``, or ``bits`` per weight."""
    if cfg.budget_bytes is not None:
        return 8 * cfg.budget_bytes
    return math.floor(cfg.bits * n_weights + 1e-9)


def allocate_plans(plans: list[BlockPlan], budget: int, cfg: BayesQConfig,
                   n_weights: int) -> None:
    """The knapsack over every block's options; sets each plan's ``choice`` (an infeasible
    ``budget_bytes`` is stated in bytes)."""
    options = [p.options for p in plans]
    if cfg.budget_bytes is None:
        choice = allocate(options, budget, solver=cfg.solver, n_weights=n_weights)
    else:
        try:
            choice = allocate(options, budget, solver=cfg.solver)
        except InfeasibleBudgetError as err:
            need = -(-err.min_cost // 8)
            raise InfeasibleBudgetError(
                f"budget_bytes={cfg.budget_bytes} is infeasible: the cheapest allocation needs "
                f"{need} bytes (metadata included); raise budget_bytes to at least {need} or "
                "allow fewer bits", err.min_cost) from None
    for plan, j in zip(plans, choice, strict=True):
        plan.choice = j
