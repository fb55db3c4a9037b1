"""The option groups of a run: small frozen dataclasses, each validating its own fields.

Each group checks its fields' types and ranges and the constraints between its own fields, with
a message that names the fix. :class:`~bayesq_lightning.config.BayesQConfig` holds the same
fields flat and checks only what spans groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..choices import (
    BACKENDS,
    QUANTIZERS,
    RANGE_OBJECTIVES,
    SCORES,
    SOLVERS,
    STRUCTURES,
    SUPPORTED_BITS,
    TABLES,
    check_bits,
)


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Refuse a value outside its option's tuple of :mod:`~bayesq_lightning.choices`."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {tuple(choices)}")


def _whole(value, minimum: int = 1) -> bool:
    """Whether ``value`` equals a whole number ``>= minimum`` (``8.0`` counts)."""
    return int(value) == value and value >= minimum


def _int(value, minimum: int = 1) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``) ``>= minimum``."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


def _check_positive_finite(group, name: str) -> None:
    value = getattr(group, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r} must be a positive finite number "
                         f"(default {type(group).__dataclass_fields__[name].default})")


@dataclass(frozen=True)
class PosteriorOptions:
    """The posterior: its covariance structure, curvature, prior and calibration data.

    Parameters
    ----------
    structure : str
        Posterior covariance: ``"kron"`` (default: K-FAC metric, error-feedback rounding under
        ``A + delta I``; ``benchmarks/structures.py`` compares the three), ``"diag"`` or
        ``"lowrank"``.
    backend : str
        Curvature backend: ``"auto"`` (default: the exact GGN up to 10 classes, the
        Monte-Carlo GGN above, since the exact one costs a backward pass per class; the report's
        ``backend`` says which), ``"asdl"`` (exact GGN diagonal), ``"asdl_stochastic"``
        (Monte-Carlo GGN) or ``"curvlinops"``.
    prior_precision : "marglik" or float
        Fitted by marginal likelihood, or fixed.
    rank : int, optional
        ``structure="lowrank"``: eigenpairs kept per layer (default 8, cut to n-1 for smaller
        layers; an explicit rank that a layer cannot hold is an error).
    calib_batches : int
        Number of calibration batches (a global count, sharded across ranks).
    kfac_batches : int, optional
        ``structure="kron"``: the first ``kfac_batches`` calibration batches carry the K-FAC
        fit, whose output factors need backward passes (one per class for the exact GGN); the
        input factors, forward passes only, use every calibration batch. So calibration sets
        beyond ``kfac_batches`` batches cost what they cost GPTQ, a forward pass each
        (``benchmarks/scale.py``). A count per process (each bounds its own backward passes);
        with a ``curvature_loader``, of its batches. ``None``: every batch for both.
    n_data : int, optional
        Training-set size the posterior stands for; default: the calibration loader's dataset
        length (the callback passes the training set's length).
    """

    structure: str = "kron"
    backend: str = "auto"
    prior_precision: str | float = "marglik"
    rank: int | None = None
    calib_batches: int = 8
    kfac_batches: int | None = 8
    n_data: int | None = None

    def __post_init__(self) -> None:
        check_choice("structure", self.structure, STRUCTURES)
        check_choice("backend", self.backend, BACKENDS)
        if not _whole(self.calib_batches):
            raise ValueError(f"calib_batches={self.calib_batches!r} must be a positive integer")
        if self.kfac_batches is not None and not _int(self.kfac_batches):
            raise ValueError(f"kfac_batches={self.kfac_batches!r} must be a positive integer "
                             "or None (every calibration batch)")
        if self.n_data is not None and not _whole(self.n_data):
            raise ValueError(f"n_data={self.n_data!r} must be a positive integer or None")
        if isinstance(self.prior_precision, str):
            if self.prior_precision != "marglik":
                raise ValueError(
                    f"prior_precision={self.prior_precision!r}: use 'marglik' or a positive number"
                )
        elif not (math.isfinite(self.prior_precision) and self.prior_precision > 0):
            raise ValueError(f"prior_precision={self.prior_precision!r} must be positive and finite")
        if self.rank is not None and not _whole(self.rank):
            raise ValueError(f"rank={self.rank!r} must be a positive integer or None")
        if self.rank is not None and self.structure != "lowrank":
            raise ValueError(f"rank={self.rank} applies to structure='lowrank' only "
                             f"(structure={self.structure!r}); drop it or switch structure")


@dataclass(frozen=True)
class GridOptions:
    """The quantization grids a block may take: uniform grids, codebooks, and their design.

    Parameters
    ----------
    quantizer : str
        ``"uniform"``, ``"nonuniform"`` or ``"auto"`` (both as knapsack candidates).
    range_objective : str
        What the quantizer design minimises (uniform clipping range, non-uniform codebook):
        ``"deployed"`` (curvature-weighted error of the stored weights, the tables' own score;
        weighted k-means for codebooks), ``"expected"`` (posterior-expected distortion;
        Lloyd-Max on the posterior mixture for codebooks), ``"minmax"`` (no clipping: the
        weights' range; plain k-means codebooks) or ``"auto"`` (default: for blocks rounded by
        error feedback -- K-FAC -- both ``"minmax"`` and ``"deployed"`` grids are candidates
        and the block's score picks one, since whether clipping pays under feedback depends
        on the model; ``"deployed"`` otherwise).
    group_size : int, optional
        Input columns per scale/zero (uniform) — ``None``: one per output channel. A size that
        does not divide the row length leaves a shorter last group (no padding is stored).
    per_row_codebook : bool
        Non-uniform quantizer: one codebook per output channel instead of one per block.
    """

    quantizer: str = "uniform"
    range_objective: str = "auto"
    group_size: int | None = None
    per_row_codebook: bool = False

    def __post_init__(self) -> None:
        check_choice("quantizer", self.quantizer, QUANTIZERS)
        check_choice("range_objective", self.range_objective, RANGE_OBJECTIVES)
        if self.group_size is not None and not _whole(self.group_size):
            raise ValueError(f"group_size={self.group_size!r} must be a positive integer or None")
        if self.group_size is not None and self.quantizer == "nonuniform":
            raise ValueError(
                f"group_size={self.group_size} applies to uniform grids, and quantizer="
                "'nonuniform' has none (one codebook per block, or per row with "
                "per_row_codebook=True); drop group_size, or use quantizer='uniform' or 'auto' "
                "(where it applies to the uniform candidates)"
            )


@dataclass(frozen=True)
class ScoringOptions:
    """How each block's candidates are scored: the tables of expected loss per width and grid.

    Parameters
    ----------
    tables : str
        ``"auto"`` (default: ``"checked"`` for ``method="bayesq"`` under ``score="curvature"``,
        else ``"closed_form"``), ``"closed_form"``, ``"mc"`` (task-aware Monte-Carlo KL) or
        ``"checked"`` (the closed form, with measured label-free substitution losses where it
        is least reliable: the grid choice, the allocation's boundary;
        :mod:`~bayesq_lightning.checks`).
    score : str
        What the tables and the grid design weigh errors by: ``"curvature"`` (default: the
        likelihood curvature ``s * GGN`` -- twice the second-order increase of the training
        loss, with no prior term) or ``"posterior_precision"`` (the curvature plus the prior
        precision ``delta``, kept as an ablation). The prior always stays in the posterior
        covariance (``range_objective="expected"``, Monte-Carlo tables).
    mc_samples : int
        Posterior samples ``S`` of the Monte-Carlo tables.
    mc_refine_top_k : int, optional
        With ``tables="mc"``: refine only the ``k`` blocks whose closed-form upgrades are
        closest to the allocation boundary (``None``: all blocks).
    posterior_temperature : float
        Monte-Carlo tables sample ``N(mu, T * Lambda^{-1})`` (``T = 1``: the posterior).
    score_rows : int, optional
        Blocks rounded by error feedback (``gptq``, ``bayesq``-kron) with more than
        ``2 * score_rows`` rows and more than one candidate design, round and score their
        candidates on ``score_rows`` seeded draws of rows (weighted by each row's curvature
        and range; the score an unbiased estimate of the block's row terms); after the
        knapsack only the chosen width's grids are designed and rounded on every row and
        scored exactly, the better one kept (:mod:`~bayesq_lightning.row_sample`).
        ``None``: every candidate on every row. Monte-Carlo tables always use whole
        candidates; the checks round the candidates they measure whole.
    check_inputs : int, optional
        ``tables="checked"``: calibration inputs the substitutions are measured on (``None``:
        all of them).
    check_top_k : int
        ``tables="checked"``: blocks nearest the allocation's boundary whose every candidate
        is measured.
    check_budget : float, optional
        ``tables="checked"``: the inputs the measured candidates' forward passes run
        together, as a share of the calibration inputs (``None``: no cap). Each measured
        candidate is one pass of ``check_inputs`` inputs (each measured block one more, for
        its reference); the grid choice of the blocks with the most at stake is measured
        first, then the boundary, while the budget lasts.
    """

    tables: str = "auto"
    score: str = "curvature"
    mc_samples: int = 4
    mc_refine_top_k: int | None = None
    posterior_temperature: float = 1.0
    score_rows: int | None = 128
    check_inputs: int | None = 16
    check_top_k: int = 8
    check_budget: float | None = 0.5

    def __post_init__(self) -> None:
        check_choice("tables", self.tables, TABLES)
        if self.check_inputs is not None and not _int(self.check_inputs):
            raise ValueError(f"check_inputs={self.check_inputs!r} must be a positive integer "
                             "or None (every calibration input)")
        if self.check_budget is not None and not (
                isinstance(self.check_budget, (int, float)) and not isinstance(
                    self.check_budget, bool) and math.isfinite(self.check_budget)
                and self.check_budget >= 0):
            raise ValueError(f"check_budget={self.check_budget!r} must be a finite number >= 0 "
                             "(a share of the calibration inputs) or None (no cap)")
        if not _int(self.check_top_k, 0):
            raise ValueError(f"check_top_k={self.check_top_k!r} must be an integer >= 0")
        # the boundary step replaces losses by measured KLs, which lack the prior term; the grid
        # step only ranks the grids of one width, in any score's units
        if self.tables == "checked" and self.score != "curvature" and self.check_top_k:
            raise ValueError("tables='checked' measures boundary losses in the units of score="
                             "'curvature'; use score='curvature' with it, or check_top_k=0 "
                             "(the measured grid choice only)")
        check_choice("score", self.score, SCORES)
        _check_positive_finite(self, "posterior_temperature")
        if self.score_rows is not None and not _int(self.score_rows, 2):
            raise ValueError(f"score_rows={self.score_rows!r} must be an integer >= 2 (rows a "
                             "block's candidates are compared on) or None (every row)")
        if not _whole(self.mc_samples):
            raise ValueError(f"mc_samples={self.mc_samples!r}: S must be an integer >= 1")
        if self.mc_refine_top_k is not None and self.tables != "mc":
            raise ValueError("mc_refine_top_k applies to tables='mc' only; set tables='mc'")
        if self.mc_refine_top_k is not None and self.mc_refine_top_k < 1:
            raise ValueError(f"mc_refine_top_k={self.mc_refine_top_k!r} must be >= 1 or None")


@dataclass(frozen=True)
class AllocationOptions:
    """The budget and what the knapsack may choose: widths, bounds and block granularity.

    Parameters
    ----------
    bits : float
        Budget: average stored bits per quantized weight, metadata (fp16 scales, zeros,
        codebooks) included. Ignored when ``budget_bytes`` is given.
    budget_bytes : int, optional
        Alternative budget: total bytes of the quantized layers.
    solver : str
        ``"greedy"`` (convex-hull greedy) or ``"dp"`` (exact).
    allowed_bits : tuple of int
        Bit-widths a block may take; a subset of ``(2, 3, 4, 8)`` (stored sorted, unique).
    block_rows : int, optional
        Output channels per allocation block (each block gets its own bit-width); a multiple
        of ``pack_multiple``. ``None``: one block per layer.
    pack_multiple : int
        Row granularity the hardware packs together; ``block_rows`` must be a multiple of it.
    min_bits : dict of str to int, optional
        Per-layer lower bounds by ``fnmatch`` name pattern, e.g. ``{"features.0.*": 8}``.
    max_bits : dict of str to int, optional
        Per-layer upper bounds by ``fnmatch`` name pattern, e.g. ``{"classifier.*": 4}``.
    """

    bits: float = 3.0
    budget_bytes: int | None = None
    solver: str = "greedy"
    allowed_bits: tuple[int, ...] = SUPPORTED_BITS
    block_rows: int | None = None
    pack_multiple: int = 1
    min_bits: dict[str, int] | None = None
    max_bits: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if self.budget_bytes is None:
            if isinstance(self.bits, bool) or not isinstance(self.bits, (int, float)):
                raise TypeError(f"bits must be a number, got {type(self.bits).__name__}")
            if not math.isfinite(self.bits) or self.bits <= 0:
                raise ValueError(
                    f"bits={self.bits!r}: the budget must be a positive finite number of "
                    "bits per weight, e.g. bits=3.0"
                )
        else:
            if not _whole(self.budget_bytes):
                raise ValueError(f"budget_bytes={self.budget_bytes!r} must be a positive integer")
            object.__setattr__(self, "budget_bytes", int(self.budget_bytes))
        check_choice("solver", self.solver, SOLVERS)
        if not self.allowed_bits:
            raise ValueError(f"allowed_bits is empty; choose a subset of {SUPPORTED_BITS}")
        object.__setattr__(self, "allowed_bits",
                           tuple(sorted({check_bits(b) for b in self.allowed_bits})))
        if not _whole(self.pack_multiple):
            raise ValueError(f"pack_multiple={self.pack_multiple!r} must be a positive integer")
        if self.block_rows is not None:
            if not _whole(self.block_rows):
                raise ValueError(f"block_rows={self.block_rows!r} must be a positive integer")
            if self.block_rows % self.pack_multiple:
                lo = self.block_rows // self.pack_multiple * self.pack_multiple or self.pack_multiple
                raise ValueError(
                    f"block_rows={self.block_rows} is not a multiple of pack_multiple="
                    f"{self.pack_multiple}; use e.g. block_rows={lo}"
                )
        for name in ("min_bits", "max_bits"):
            for pattern, b in (getattr(self, name) or {}).items():
                if not isinstance(pattern, str):
                    raise TypeError(f"{name} keys are layer-name patterns (str), got {pattern!r}")
                check_bits(b)


@dataclass(frozen=True)
class RoundingOptions:
    """Error-feedback rounding (GPTQ's, and BayesQ's under K-FAC).

    Parameters
    ----------
    damp : float
        Error-feedback damping relative to the rounding matrix's scale:
        ``gamma = damp * mean(diag H)``, for ``gptq`` and ``bayesq``-kron alike (GPTQ's 0.01).
    act_order : bool
        Error feedback processes columns by descending ``diag(H)`` (GPTQ's act-order).
    adaround_iters : int
        ``method="adaround"``: Adam iterations per layer.
    adaround_batch : int
        ``method="adaround"``: input rows each iteration draws (token vectors for a Linear
        layer, images for a Conv2d); clamped to the calibration set's rows, with a warning.
    """

    damp: float = 0.01
    act_order: bool = False
    adaround_iters: int = 1000
    adaround_batch: int = 64

    def __post_init__(self) -> None:
        _check_positive_finite(self, "damp")
        for name in ("adaround_iters", "adaround_batch"):
            if not _int(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer "
                                 f"(default {type(self).__dataclass_fields__[name].default})")


# The keyword each group is passed and read under, in the order the groups are documented.
GROUPS: tuple[tuple[str, type], ...] = (
    ("posterior", PosteriorOptions),
    ("grid", GridOptions),
    ("scoring", ScoringOptions),
    ("allocation", AllocationOptions),
    ("rounding", RoundingOptions),
)
