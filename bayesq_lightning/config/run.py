"""``BayesQConfig``: every option of a quantization run, validated once, up front."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import TypeVar

from ..choices import METHODS, POSTERIOR_METHODS
from .groups import (
    GROUPS,
    AllocationOptions,
    GridOptions,
    PosteriorOptions,
    RoundingOptions,
    ScoringOptions,
    check_choice,
)

Group = TypeVar("Group")


def _parameter_entries(cls: type) -> str:
    """The entries of the Parameters section that ends ``cls``'s numpy-style docstring."""
    return inspect.cleandoc(cls.__doc__ or "").split("Parameters\n----------\n", 1)[1]


def _accept_groups(cls: type) -> type:
    """Let ``cls(...)`` take whole option groups beside its flat fields; document their fields.

    The generated ``__init__`` (flat fields only) stays the signature that :mod:`inspect` and the
    CLI see. A group keyword is unpacked into its fields; a field given both in a group and flat
    is an error. The groups' Parameters entries are appended to ``cls.__doc__``, where
    :func:`help` and the CLI's option descriptions read them.
    """
    flat_init = cls.__init__
    names = [f.name for f in fields(cls)]

    @functools.wraps(flat_init)
    def __init__(self, *args, **kwargs) -> None:
        flat = {**dict(zip(names, args, strict=False)), **kwargs}  # extra args: flat_init raises
        for key, group_cls in GROUPS:
            group = kwargs.pop(key, None)
            if group is None:
                continue
            if not isinstance(group, group_cls):
                raise TypeError(f"{key} must be a {group_cls.__name__}, got "
                                f"{type(group).__name__}")
            for f in fields(group):
                if f.name in flat:
                    raise ValueError(
                        f"{f.name} is set twice: {f.name}={flat[f.name]!r} and "
                        f"{key}={group_cls.__name__}({f.name}={getattr(group, f.name)!r}, ...); "
                        f"set it in one place"
                    )
                kwargs[f.name] = getattr(group, f.name)
        flat_init(self, *args, **kwargs)

    cls.__init__ = __init__
    cls.__doc__ = "\n".join([inspect.cleandoc(cls.__doc__ or ""),
                             *(_parameter_entries(group_cls) for _, group_cls in GROUPS)])
    return cls


@_accept_groups
@dataclass
class BayesQConfig:
    """Configuration of :func:`bayesq_lightning.quantize_model`.

    The options form groups, each a frozen dataclass that validates its own fields:
    ``posterior`` (:class:`~bayesq_lightning.config.PosteriorOptions`), ``grid``
    (:class:`~bayesq_lightning.config.GridOptions`), ``scoring``
    (:class:`~bayesq_lightning.config.ScoringOptions`), ``allocation``
    (:class:`~bayesq_lightning.config.AllocationOptions`) and ``rounding``
    (:class:`~bayesq_lightning.config.RoundingOptions`); the config itself checks only what spans
    groups. A field is passed flat (``BayesQConfig(bits=3, structure="diag")``, as the CLI does)
    or within its group (``BayesQConfig(posterior=PosteriorOptions(structure="diag"))``), not
    both. It is read flat (``cfg.structure``) or grouped (``cfg.posterior.structure``, from a
    validated copy). The fields are stored flat: :meth:`to_dict` and
    :func:`dataclasses.replace` take and give the flat fields.

    Parameters
    ----------
    method : str
        ``"bayesq"`` (posterior-weighted) or a baseline sharing everything else: ``"rtn"``
        (unweighted MSE tables, min-max ranges), ``"mse"`` (BayesQ's pipeline with unit
        precision: MSE-searched ranges and MSE tables, the posterior ablated), ``"gptq"``,
        ``"hawq"`` (Hessian trace x quantization error), ``"adaround"`` (GPTQ's grids and
        allocation, then learned rounding).
    include : sequence of str, optional
        ``fnmatch`` patterns over layer names: only matching layers are quantized (a string is
        one pattern).
    exclude : sequence of str, optional
        ``fnmatch`` patterns over layer names: matching layers are not quantized (a string is
        one pattern).
    seed : int
        Seed of every random choice (posterior samples, stochastic curvature).
    quantize_embeddings : bool
        Also quantize ``nn.Embedding`` layers (opt-in): per-row grids, counted in the budget.
        Blocks with rows no calibration batch looks up (no data curvature) are held at a floor
        width: the widest allowed width within the budget. Default ``False``: embeddings stay
        in floating point.
    posterior, grid, scoring, allocation, rounding : option group, optional
        A whole group, in place of its fields (documented below, group by group).
    """

    bits: float = AllocationOptions.bits
    budget_bytes: int | None = AllocationOptions.budget_bytes
    method: str = "bayesq"
    structure: str = PosteriorOptions.structure
    quantizer: str = GridOptions.quantizer
    tables: str = ScoringOptions.tables
    solver: str = AllocationOptions.solver
    allowed_bits: tuple[int, ...] = AllocationOptions.allowed_bits
    calib_batches: int = PosteriorOptions.calib_batches
    kfac_batches: int | None = PosteriorOptions.kfac_batches
    n_data: int | None = PosteriorOptions.n_data
    prior_precision: str | float = PosteriorOptions.prior_precision
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    backend: str = PosteriorOptions.backend
    range_objective: str = GridOptions.range_objective
    rank: int | None = PosteriorOptions.rank
    group_size: int | None = GridOptions.group_size
    block_rows: int | None = AllocationOptions.block_rows
    pack_multiple: int = AllocationOptions.pack_multiple
    min_bits: dict[str, int] | None = AllocationOptions.min_bits
    max_bits: dict[str, int] | None = AllocationOptions.max_bits
    per_row_codebook: bool = GridOptions.per_row_codebook
    mc_samples: int = ScoringOptions.mc_samples
    mc_refine_top_k: int | None = ScoringOptions.mc_refine_top_k
    score: str = ScoringOptions.score
    damp: float = RoundingOptions.damp
    act_order: bool = RoundingOptions.act_order
    score_rows: int | None = ScoringOptions.score_rows
    posterior_temperature: float = ScoringOptions.posterior_temperature
    seed: int = 0
    adaround_iters: int = RoundingOptions.adaround_iters
    adaround_batch: int = RoundingOptions.adaround_batch
    check_inputs: int | None = ScoringOptions.check_inputs
    check_top_k: int = ScoringOptions.check_top_k
    check_budget: float | None = ScoringOptions.check_budget
    quantize_embeddings: bool = False

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        if not isinstance(self.quantize_embeddings, bool):
            raise TypeError(f"quantize_embeddings must be True or False, got "
                            f"{self.quantize_embeddings!r}")
        for _, group_cls in GROUPS:
            group = self._group(group_cls)  # validates the group's fields
            for f in fields(group):  # normalised values (sorted allowed_bits, int budget_bytes)
                setattr(self, f.name, getattr(group, f.name))
        if self.tables not in ("auto", "closed_form") and self.method not in POSTERIOR_METHODS:
            raise ValueError(
                f"tables={self.tables!r} scores in the units of the posterior's curvature, "
                f"which method={self.method!r} does not fit; use tables='closed_form' for this "
                "method"
            )
        if self.method == "adaround" and self.quantizer != "uniform":
            raise ValueError(
                f"method='adaround' learns rounding on uniform grids; quantizer="
                f"{self.quantizer!r} is not supported: use quantizer='uniform'"
            )
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, (value,))

    @property
    def resolved_tables(self) -> str:
        """``tables`` with ``"auto"`` resolved: the measured checks for BayesQ under its default
        score (``"checked"``), the closed form for the baselines, whose published methods
        score in closed form, and for ``score="posterior_precision"``, whose units the checks
        do not share."""
        if self.tables != "auto":
            return self.tables
        return "checked" if (self.method, self.score) == ("bayesq", "curvature") else "closed_form"

    def _group(self, group_cls: type[Group]) -> Group:
        return group_cls(**{f.name: getattr(self, f.name) for f in fields(group_cls)})

    @property
    def posterior(self) -> PosteriorOptions:
        return self._group(PosteriorOptions)

    @property
    def grid(self) -> GridOptions:
        return self._group(GridOptions)

    @property
    def scoring(self) -> ScoringOptions:
        return self._group(ScoringOptions)

    @property
    def allocation(self) -> AllocationOptions:
        return self._group(AllocationOptions)

    @property
    def rounding(self) -> RoundingOptions:
        return self._group(RoundingOptions)

    def to_dict(self) -> dict:
        """Every field, flat, in declaration order (stored in reports and resume states)."""
        return asdict(self)
