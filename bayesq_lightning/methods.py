r"""One record per method: what it needs, how it designs a block's grid and how it scores it.

Every method shares the rest of the pipeline (candidates at every allowed width, the knapsack,
packing and accounting); they differ only in the fields of :class:`Method`:

========  ===========  =================  ==============  =========================================
method    data         posterior          grid design     block loss of :math:`\Delta = Q - W`
========  ===========  =================  ==============  =========================================
bayesq    calibration  ``cfg.structure``  curvature diag  the posterior's ``block_loss``: the
                                                          curvature ``s H`` (``score="curvature"``)
                                                          or ``s H + delta I``; kron rounds by
                                                          error feedback under ``A``
mse       none         none               unit weights    :math:`\|\Delta\|^2`
rtn       none         none               min-max         :math:`\|\Delta\|^2`
hawq      calibration  diag               min-max         :math:`\overline{s\,\mathrm{GGN}}\,\|\Delta\|^2`
gptq      calibration  none (input        min-max         :math:`\mathrm{tr}(\Delta H \Delta^\top)`,
                       Hessians)                          error feedback under ``H = X X^T / n``
adaround  calibration  none (input        min-max         GPTQ's tables and allocation; then the
                       Hessians)                          chosen grids' codes learned layer by
                                                          layer (:mod:`~bayesq_lightning.adaround`)
========  ===========  =================  ==============  =========================================

Error feedback always damps relative to the rounding matrix: ``gamma = damp * mean(diag H)``.

Adding a method is adding a record to :data:`METHODS_TABLE`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .choices import METHODS, POSTERIOR_METHODS
from .rounding import output_error, row_output_errors
from .row_sample import RowTerms

if TYPE_CHECKING:
    from .config import BayesQConfig
    from .posterior import LayerPosterior


@dataclass(frozen=True)
class BlockInputs:
    """What the pipeline needs to design, round and score one block (rows ``r0:r1``)."""

    precision: Tensor | None  # posterior precision (rows, cols): sigma of "expected"; None: min-max
    loss: Callable[[Tensor], float]  # the block's loss of its error dW = Q - W (rows, cols)
    H: Tensor | None = None  # input-side matrix of error-feedback rounding; None: nearest
    weight: Tensor | None = None  # design importance per weight; None: the precision
    row_terms: RowTerms | None = None  # None: every candidate scored on every row


@dataclass(frozen=True)
class BlockContext:
    """One block of one layer, and the statistics its method may read."""

    layer: str
    w: Tensor  # the whole layer's weight, (out, cols) fp32 on the CPU
    rows: tuple[int, int]
    posterior: LayerPosterior | None = None
    hessian: Tensor | None = None  # the layer's input Hessian (gptq)
    with_prior: bool = False  # BayesQConfig.score == "posterior_precision": the loss adds delta
    # range_objective == "expected": the grid design reads the precision's values (and delta)
    design_precision: bool = False


def _weighted_sq(weight: float, dW: Tensor) -> float:
    dW = dW.double()
    return float((weight * dW * dW).sum())


def _bayesq(ctx: BlockContext) -> BlockInputs:
    lp, prior = ctx.posterior, ctx.with_prior
    H = lp.rounding_matrix(ctx.rows)
    weight = lp.design_weights(ctx.rows, prior=prior)
    # the range search reads the precision's values only under "expected"; otherwise it needs
    # one given (else min-max) and scores with the design weights, which stand in for it: the
    # same grids, and no prior precision (K-FAC's is solved only when read)
    precision = lp.precision_rows(ctx.rows) if ctx.design_precision else weight
    return BlockInputs(precision=precision, loss=lp.block_loss(ctx.rows, prior), H=H,
                       weight=weight, row_terms=None if H is None else lp.row_terms(ctx.rows, prior))


def _mse(ctx: BlockContext) -> BlockInputs:  # the posterior ablated: same search, unit weights
    r0, r1 = ctx.rows
    return BlockInputs(precision=torch.ones(r1 - r0, ctx.w.shape[1]),
                       loss=partial(_weighted_sq, 1.0))


def _rtn(ctx: BlockContext) -> BlockInputs:
    return BlockInputs(precision=None, loss=partial(_weighted_sq, 1.0))


def _hawq(ctx: BlockContext) -> BlockInputs:  # mean GGN diagonal: the layer's Hessian trace
    trace = float(ctx.posterior.curvature.double().mean())
    return BlockInputs(precision=None, loss=partial(_weighted_sq, trace))


def _row_weighted_sq(weights: Tensor, dW: Tensor) -> float:
    return float((weights.unsqueeze(1) * dW.double().square()).sum())


def _gptq(ctx: BlockContext) -> BlockInputs:
    H = ctx.hessian.cpu()  # every score input lives on the CPU
    if H.dim() == 1:  # an embedding: one weight per row (its share of lookups), no coupling
        rows = H[ctx.rows[0]:ctx.rows[1]].double()
        return BlockInputs(precision=None, loss=partial(_row_weighted_sq, rows))
    loss = partial(output_error, H=H, rows=ctx.rows, layer_rows=ctx.w.shape[0])
    if H.dim() == 3:  # a grouped conv's rows each have their group's H: scored on every row
        return BlockInputs(precision=None, loss=loss, H=H)
    ones = torch.ones(ctx.rows[1] - ctx.rows[0], dtype=torch.float64)
    return BlockInputs(precision=None, loss=loss, H=H,
                       row_terms=RowTerms(ones, lambda dW, idx: row_output_errors(dW, H)))


@dataclass(frozen=True, kw_only=True)
class Method:
    """A quantization method as data.

    Attributes
    ----------
    name : str
        The ``BayesQConfig.method`` value.
    needs_calibration : bool
        Reads calibration batches (all but ``rtn`` and ``mse``).
    fits_posterior : bool
        Fits a posterior. Monte-Carlo tables sample it, so only these methods accept
        ``tables="mc"``.
    structure : str or None
        The structure of that posterior; ``None``: ``BayesQConfig.structure``.
    input_hessians : bool
        Collects each layer's ``X X^T / n`` (GPTQ).
    posterior_design : bool
        The grid design follows ``BayesQConfig.range_objective``; otherwise it minimises the
        error of the stored weights (``"deployed"``).
    block : callable
        ``BlockContext -> BlockInputs``.
    learns_rounding : bool
        After allocation, the chosen grids' codes are learned by AdaRound
        (:func:`~bayesq_lightning.adaround.adaround_layers`).
    """

    name: str
    needs_calibration: bool
    fits_posterior: bool
    structure: str | None = None
    input_hessians: bool = False
    posterior_design: bool = False
    block: Callable[[BlockContext], BlockInputs]
    learns_rounding: bool = False

    @property
    def supports_mc_tables(self) -> bool:
        return self.fits_posterior

    def posterior_structure(self, cfg: BayesQConfig) -> str | None:
        """The structure this method fits under ``cfg`` (``None``: no posterior)."""
        if not self.fits_posterior:
            return None
        return self.structure or cfg.structure

    def range_objectives(self, cfg: BayesQConfig, feedback: bool) -> tuple[str, ...]:
        """The grid designs tried for a block under ``cfg`` (each one a knapsack candidate).

        ``"minmax"``, ``"deployed"`` or ``"expected"``; ``feedback``: the block's codes come
        from error-feedback rounding. ``"auto"`` tries both the weights' own range and the
        clipped one under feedback, and lets the block's loss choose.
        """
        objective = cfg.range_objective if self.posterior_design else "deployed"
        if objective == "auto":
            return ("minmax", "deployed") if feedback else ("deployed",)
        return (objective,)


METHODS_TABLE: dict[str, Method] = {
    m.name: m for m in (
        Method(name="bayesq", needs_calibration=True, fits_posterior=True,
               posterior_design=True, block=_bayesq),
        Method(name="rtn", needs_calibration=False, fits_posterior=False, block=_rtn),
        Method(name="gptq", needs_calibration=True, fits_posterior=False, input_hessians=True,
               block=_gptq),
        Method(name="hawq", needs_calibration=True, fits_posterior=True, structure="diag",
               block=_hawq),
        Method(name="mse", needs_calibration=False, fits_posterior=False, block=_mse),
        Method(name="adaround", needs_calibration=True, fits_posterior=False,
               input_hessians=True, block=_gptq, learns_rounding=True),
    )
}
if tuple(METHODS_TABLE) != METHODS or POSTERIOR_METHODS != tuple(
        m.name for m in METHODS_TABLE.values() if m.fits_posterior):
    raise ImportError("choices.METHODS / POSTERIOR_METHODS disagree with METHODS_TABLE")
