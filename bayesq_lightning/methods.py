r"""One record per method: what it needs, how it designs a block's grid and how it scores it.

Every method shares the rest of the pipeline (candidates at every allowed width, the knapsack,
packing and accounting); they differ only in the fields of :class:`Method`:

========  ===========  =================  ==============  =========================================
method    data         posterior          grid design     block score of :math:`\Delta = Q - W`
========  ===========  =================  ==============  =========================================
bayesq    calibration  ``cfg.structure``  curvature diag  the posterior's ``quad_form``: the
                                                          curvature ``s H`` (``score="curvature"``)
                                                          or ``s H + delta I``; kron rounds by
                                                          error feedback under ``A``
mse       calibration  none               unit weights    :math:`\|\Delta\|^2`
rtn       none         none               min-max         :math:`\|\Delta\|^2`
hawq      calibration  diag               min-max         :math:`\overline{s\,\mathrm{GGN}}\,\|\Delta\|^2`
gptq      calibration  none (input        min-max         :math:`\mathrm{tr}(\Delta H \Delta^\top)`,
                       Hessians)                          error feedback under ``H = X X^T / n``
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

if TYPE_CHECKING:
    from .config import BayesQConfig
    from .posterior import LayerPosterior




@dataclass(frozen=True)
class BlockInputs:
    """What the pipeline needs to design, round and score one block."""

    precision: Tensor | None  # posterior precision (rows, cols): sigma of "expected"; None: min-max
    score: Callable[[Tensor], float]  # loss of the block's error dW = Q - W (rows, cols)
    H: Tensor | None = None  # input-side matrix of error-feedback rounding; None: nearest
    weight: Tensor | None = None  # design importance per weight; None: the precision
    # row scales and (dW of rows idx, idx) -> those rows' terms of score, for choosing the
    # width on a row sample (row_sample); None: every candidate scored on every row
    row_form: tuple[Tensor, Callable[[Tensor, Tensor], Tensor]] | None = None


@dataclass(frozen=True)
class BlockContext:
    """One block of one layer, and the statistics its method may read."""

    name: str
    w: Tensor  # the whole layer's weight, (out, cols) fp32 on the CPU
    rows: tuple[int, int]
    posterior: LayerPosterior | None
    hessian: Tensor | None  # the layer's input Hessian (gptq)
    score: str = "curvature"  # BayesQConfig.score


def _weighted_sq(weight: float, dW: Tensor) -> float:
    dW = dW.double()
    return float((weight * dW * dW).sum())


def _bayesq(ctx: BlockContext) -> BlockInputs:
    lp = ctx.posterior
    prior = ctx.score == "posterior_precision"
    precision = lp.precision_rows(ctx.rows)
    rounding = lp.rounding_matrix(ctx.rows)
    if rounding is None:
        return BlockInputs(precision, lp.block_form(ctx.rows, prior), None,
                           lp.design_weights(ctx.rows, prior=prior))
    return BlockInputs(precision, lp.block_form(ctx.rows, prior), rounding[0],
                       lp.design_weights(ctx.rows, prior=prior), lp.row_form(ctx.rows, prior))


def _mse(ctx: BlockContext) -> BlockInputs:  # the posterior ablated: same search, unit weights
    r0, r1 = ctx.rows
    return BlockInputs(torch.ones(r1 - r0, ctx.w.shape[1]), partial(_weighted_sq, 1.0))


def _rtn(ctx: BlockContext) -> BlockInputs:
    return BlockInputs(None, partial(_weighted_sq, 1.0))


def _hawq(ctx: BlockContext) -> BlockInputs:  # mean GGN diagonal: the layer's Hessian trace
    trace = float(ctx.posterior.curvature.double().mean())
    return BlockInputs(None, partial(_weighted_sq, trace))


def _gptq(ctx: BlockContext) -> BlockInputs:
    H = ctx.hessian.cpu()  # every score input lives on the CPU
    score = partial(output_error, H=H, rows=ctx.rows, layer_rows=ctx.w.shape[0])
    if H.dim() == 3:  # a grouped conv's rows each have their group's H: scored on every row
        return BlockInputs(None, score, H)
    return BlockInputs(None, score, H, row_form=(torch.ones(ctx.rows[1] - ctx.rows[0],
                                                            dtype=torch.float64),
                                                 lambda dW, idx: row_output_errors(dW, H)))


@dataclass(frozen=True)
class Method:
    """A quantization method as data.

    Attributes
    ----------
    name : str
        The ``BayesQConfig.method`` value.
    needs_calibration : bool
        Reads calibration batches (all but ``rtn`` and ``mse``).
    posterior : str or None
        Posterior structure it fits: ``"config"`` (``BayesQConfig.structure``), a structure
        name, or ``None``. Monte-Carlo tables sample this posterior, so only methods with one
        accept ``tables="mc"``.
    input_hessians : bool
        Collects each layer's ``X X^T / n`` (GPTQ).
    posterior_design : bool
        The grid design follows ``BayesQConfig.range_objective``; otherwise it minimises the
        error of the stored weights (``"deployed"``).
    block : callable
        ``BlockContext -> BlockInputs``.
    """

    name: str
    needs_calibration: bool
    posterior: str | None
    input_hessians: bool
    posterior_design: bool
    block: Callable[[BlockContext], BlockInputs]

    @property
    def supports_mc_tables(self) -> bool:
        return self.posterior is not None

    def posterior_structure(self, cfg: BayesQConfig) -> str | None:
        """The structure this method fits under ``cfg`` (``None``: no posterior)."""
        return cfg.structure if self.posterior == "config" else self.posterior

    def design_objectives(self, cfg: BayesQConfig, feedback: bool) -> tuple[str, ...]:
        """The grid designs tried for a block under ``cfg`` (each one a knapsack candidate).

        ``"minmax"``, ``"deployed"`` or ``"expected"``; ``feedback``: the block's codes come
        from error-feedback rounding. ``"auto"`` tries both the weights' own range and the
        clipped one under feedback, and lets the block's score choose.
        """
        objective = cfg.range_objective if self.posterior_design else "deployed"
        if objective == "auto":
            return ("minmax", "deployed") if feedback else ("deployed",)
        return (objective,)


METHODS_TABLE: dict[str, Method] = {
    m.name: m for m in (
        Method("bayesq", True, "config", False, True, _bayesq),
        Method("rtn", False, None, False, False, _rtn),
        Method("gptq", True, None, True, False, _gptq),
        Method("hawq", True, "diag", False, False, _hawq),
        Method("mse", False, None, False, False, _mse),  # unit weights: reads no data
    )
}
if tuple(METHODS_TABLE) != METHODS or POSTERIOR_METHODS != tuple(
        m.name for m in METHODS_TABLE.values() if m.supports_mc_tables):
    raise ImportError("choices.METHODS / POSTERIOR_METHODS disagree with METHODS_TABLE")
