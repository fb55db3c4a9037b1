"""``BayesQConfig``: every option of a quantization run, validated once, up front."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .choices import (
    BACKENDS,
    METHODS,
    POSTERIOR_METHODS,
    QUANTIZERS,
    RANGE_OBJECTIVES,
    SCORES,
    SOLVERS,
    STRUCTURES,
    SUPPORTED_BITS,
    TABLES,
    check_bits,
)


def _choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {tuple(choices)}")


@dataclass
class BayesQConfig:
    """Configuration of :func:`bayesq_lightning.quantize_model`.

    Parameters
    ----------
    bits : float
        Budget: average stored bits per quantized weight, metadata (fp16 scales, zeros,
        codebooks) included. Ignored when ``budget_bytes`` is given.
    budget_bytes : int, optional
        Alternative budget: total bytes of the quantized layers.
    method : str
        ``"bayesq"`` (posterior-weighted) or a baseline sharing everything else: ``"rtn"``
        (unweighted MSE tables, min-max ranges), ``"mse"`` (BayesQ's pipeline with unit
        precision: MSE-searched ranges and MSE tables, the posterior ablated), ``"gptq"``,
        ``"hawq"`` (Hessian trace x quantization error).
    structure : str
        Posterior covariance: ``"kron"`` (default: K-FAC metric, error-feedback rounding under
        ``A + delta I``; best accuracy and NLL at every budget in ``benchmarks/structures.py``),
        ``"diag"`` or ``"lowrank"``.
    quantizer : str
        ``"uniform"``, ``"nonuniform"`` or ``"auto"`` (both as knapsack candidates).
    tables : str
        ``"closed_form"`` or ``"mc"`` (task-aware Monte-Carlo KL).
    solver : str
        ``"greedy"`` (convex-hull greedy) or ``"dp"`` (exact).
    allowed_bits : tuple of int
        Bit-widths a block may take; a subset of ``(2, 3, 4, 8)``.
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
    prior_precision : "marglik" or float
        Fitted by marginal likelihood, or fixed.
    include, exclude : sequence of str, optional
        ``fnmatch`` patterns over layer names selecting which layers are quantized.
    backend : str
        Curvature backend: ``"auto"`` (default: the exact GGN up to 10 classes, the
        Monte-Carlo GGN above, since the exact one costs a backward pass per class; the report's
        ``backend`` says which), ``"asdl"`` (exact GGN diagonal), ``"asdl_stochastic"``
        (Monte-Carlo GGN) or ``"curvlinops"``.
    range_objective : str
        What the quantizer design minimises (uniform clipping range, non-uniform codebook):
        ``"deployed"`` (curvature-weighted error of the stored weights, the tables' own score;
        weighted k-means for codebooks), ``"expected"`` (posterior-expected distortion;
        Lloyd-Max on the posterior mixture for codebooks), ``"minmax"`` (no clipping: the
        weights' range; plain k-means codebooks) or ``"auto"`` (default: for blocks rounded by
        error feedback -- K-FAC -- both ``"minmax"`` and ``"deployed"`` grids are candidates
        and the block's score picks one, since whether clipping pays under feedback depends
        on the model (it cost 4 points on the Fashion CNN and gained 18 on MiniLM at ~2.1
        bits); ``"deployed"`` otherwise).
    rank : int, optional
        ``structure="lowrank"``: eigenpairs kept per layer (default 8, cut to n-1 for smaller
        layers; an explicit rank that a layer cannot hold is an error).
    group_size : int, optional
        Input columns per scale/zero (uniform) — ``None``: one per output channel. A size that
        does not divide the row length leaves a shorter last group (no padding is stored).
    block_rows : int, optional
        Output channels per allocation block (each block gets its own bit-width); a multiple
        of ``pack_multiple``. ``None``: one block per layer.
    pack_multiple : int
        Row granularity the hardware packs together; ``block_rows`` must be a multiple of it.
    min_bits, max_bits : dict of str to int, optional
        Per-layer bounds by ``fnmatch`` name pattern, e.g. ``{"features.0.*": 8}``.
    per_row_codebook : bool
        Non-uniform quantizer: one codebook per output channel instead of one per block.
    mc_samples : int
        Posterior samples ``S`` of the Monte-Carlo tables.
    mc_refine_top_k : int, optional
        With ``tables="mc"``: refine only the ``k`` blocks whose closed-form upgrades are
        closest to the allocation boundary (``None``: all blocks).
    score : str
        What the tables and the grid design weigh errors by: ``"curvature"`` (default: the
        likelihood curvature ``s * GGN`` -- twice the second-order increase of the training
        loss, with no prior term) or ``"posterior_precision"`` (the curvature plus the prior
        precision ``delta``: the first wave's score, kept for the ablation). The prior always
        stays in the posterior covariance (``range_objective="expected"``, Monte-Carlo tables).
    damp : float
        Error-feedback damping relative to the rounding matrix's scale:
        ``gamma = damp * mean(diag H)``, for ``gptq`` and ``bayesq``-kron alike (GPTQ's 0.01).
    act_order : bool
        Error feedback processes columns by descending ``diag(H)`` (GPTQ's act-order).
    score_rows : int, optional
        Blocks rounded by error feedback (``gptq``, ``bayesq``-kron) with more than
        ``2 * score_rows`` rows and more than one candidate design, round and score their
        candidates on ``score_rows`` seeded draws of rows (weighted by each row's curvature
        and range; the score an unbiased estimate of the block's row terms); after the
        knapsack only the chosen width's grids are designed and rounded on every row and
        scored exactly, the better one kept (:mod:`~bayesq_lightning.row_sample`).
        ``None``: every candidate on every row. Monte-Carlo tables always use whole candidates.
    posterior_temperature : float
        Monte-Carlo tables sample ``N(mu, T * Lambda^{-1})`` (``T = 1``: the posterior).
    seed : int
        Seed of every random choice (posterior samples, stochastic curvature).
    """

    bits: float = 3.0
    budget_bytes: int | None = None
    method: str = "bayesq"
    structure: str = "kron"
    quantizer: str = "uniform"
    tables: str = "closed_form"
    solver: str = "greedy"
    allowed_bits: tuple[int, ...] = SUPPORTED_BITS
    calib_batches: int = 8
    kfac_batches: int | None = 8
    n_data: int | None = None
    prior_precision: str | float = "marglik"
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    backend: str = "auto"
    range_objective: str = "auto"
    rank: int | None = None
    group_size: int | None = None
    block_rows: int | None = None
    pack_multiple: int = 1
    min_bits: dict[str, int] | None = None
    max_bits: dict[str, int] | None = None
    per_row_codebook: bool = False
    mc_samples: int = 4
    mc_refine_top_k: int | None = None
    score: str = "curvature"
    damp: float = 0.01
    act_order: bool = False
    score_rows: int | None = 128
    posterior_temperature: float = 1.0
    seed: int = 0

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
            if int(self.budget_bytes) != self.budget_bytes or self.budget_bytes <= 0:
                raise ValueError(f"budget_bytes={self.budget_bytes!r} must be a positive integer")
            self.budget_bytes = int(self.budget_bytes)
        _choice("method", self.method, METHODS)
        _choice("structure", self.structure, STRUCTURES)
        _choice("quantizer", self.quantizer, QUANTIZERS)
        _choice("tables", self.tables, TABLES)
        _choice("solver", self.solver, SOLVERS)
        _choice("backend", self.backend, BACKENDS)
        _choice("range_objective", self.range_objective, RANGE_OBJECTIVES)
        _choice("score", self.score, SCORES)
        for name in ("damp", "posterior_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a positive finite number "
                                 f"(default {type(self).__dataclass_fields__[name].default})")
        if not self.allowed_bits:
            raise ValueError(f"allowed_bits is empty; choose a subset of {SUPPORTED_BITS}")
        self.allowed_bits = tuple(sorted({check_bits(b) for b in self.allowed_bits}))
        if int(self.calib_batches) != self.calib_batches or self.calib_batches < 1:
            raise ValueError(f"calib_batches={self.calib_batches!r} must be a positive integer")
        if self.kfac_batches is not None and (isinstance(self.kfac_batches, bool)
                                              or not isinstance(self.kfac_batches, int)
                                              or self.kfac_batches < 1):
            raise ValueError(f"kfac_batches={self.kfac_batches!r} must be a positive integer "
                             "or None (every calibration batch)")
        if self.score_rows is not None and (isinstance(self.score_rows, bool)
                                            or not isinstance(self.score_rows, int)
                                            or self.score_rows < 2):
            raise ValueError(f"score_rows={self.score_rows!r} must be an integer >= 2 (rows a "
                             "block's candidates are compared on) or None (every row)")
        if self.n_data is not None and (int(self.n_data) != self.n_data or self.n_data < 1):
            raise ValueError(f"n_data={self.n_data!r} must be a positive integer or None")
        if isinstance(self.prior_precision, str):
            if self.prior_precision != "marglik":
                raise ValueError(
                    f"prior_precision={self.prior_precision!r}: use 'marglik' or a positive number"
                )
        elif not (math.isfinite(self.prior_precision) and self.prior_precision > 0):
            raise ValueError(f"prior_precision={self.prior_precision!r} must be positive and finite")
        if self.group_size is not None and (int(self.group_size) != self.group_size
                                            or self.group_size < 1):
            raise ValueError(f"group_size={self.group_size!r} must be a positive integer or None")
        if self.group_size is not None and self.quantizer == "nonuniform":
            raise ValueError(
                f"group_size={self.group_size} applies to uniform grids, and quantizer="
                "'nonuniform' has none (one codebook per block, or per row with "
                "per_row_codebook=True); drop group_size, or use quantizer='uniform' or 'auto' "
                "(where it applies to the uniform candidates)"
            )
        if int(self.pack_multiple) != self.pack_multiple or self.pack_multiple < 1:
            raise ValueError(f"pack_multiple={self.pack_multiple!r} must be a positive integer")
        if self.block_rows is not None:
            if int(self.block_rows) != self.block_rows or self.block_rows < 1:
                raise ValueError(f"block_rows={self.block_rows!r} must be a positive integer")
            if self.block_rows % self.pack_multiple:
                lo = self.block_rows // self.pack_multiple * self.pack_multiple or self.pack_multiple
                raise ValueError(
                    f"block_rows={self.block_rows} is not a multiple of pack_multiple="
                    f"{self.pack_multiple}; use e.g. block_rows={lo}"
                )
        if self.rank is not None and (int(self.rank) != self.rank or self.rank < 1):
            raise ValueError(f"rank={self.rank!r} must be a positive integer or None")
        if self.rank is not None and self.structure != "lowrank":
            raise ValueError(f"rank={self.rank} applies to structure='lowrank' only "
                             f"(structure={self.structure!r}); drop it or switch structure")
        if self.tables == "mc" and self.method not in POSTERIOR_METHODS:
            raise ValueError(
                f"tables='mc' samples the posterior, which method={self.method!r} does not fit; "
                "use tables='closed_form' for this method"
            )
        if int(self.mc_samples) != self.mc_samples or self.mc_samples < 1:
            raise ValueError(f"mc_samples={self.mc_samples!r}: S must be an integer >= 1")
        if self.mc_refine_top_k is not None and self.tables != "mc":
            raise ValueError("mc_refine_top_k applies to tables='mc' only; set tables='mc'")
        if self.mc_refine_top_k is not None and self.mc_refine_top_k < 1:
            raise ValueError(f"mc_refine_top_k={self.mc_refine_top_k!r} must be >= 1 or None")
        for name in ("min_bits", "max_bits"):
            for pattern, b in (getattr(self, name) or {}).items():
                if not isinstance(pattern, str):
                    raise TypeError(f"{name} keys are layer-name patterns (str), got {pattern!r}")
                check_bits(b)
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, (value,))

    def to_dict(self) -> dict:
        return asdict(self)
