"""BayesQConfig: every option validated up front, with a message that names the fix."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from bayesq_lightning import BayesQConfig
from bayesq_lightning.choices import BACKENDS, METHODS, QUANTIZERS, SOLVERS, STRUCTURES, TABLES
from bayesq_lightning.config import (
    AllocationOptions,
    GridOptions,
    PosteriorOptions,
    RoundingOptions,
    ScoringOptions,
)
from bayesq_lightning.config.groups import GROUPS
from bayesq_lightning.methods import METHODS_TABLE


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"bits": 0}, ValueError, "positive finite"),
        ({"bits": float("nan")}, ValueError, "positive finite"),
        ({"allowed_bits": (3, 5)}, ValueError, "unsupported bit-width 5"),
        ({"allowed_bits": ()}, ValueError, "allowed_bits is empty"),
        ({"method": "magic"}, ValueError, "not one of"),
        ({"structure": "full"}, ValueError, "not one of"),
        ({"rank": 0}, ValueError, "rank=0"),
        ({"quantizer": "lattice"}, ValueError, "not one of"),
        ({"calib_batches": 0}, ValueError, "positive integer"),
        ({"prior_precision": -1.0}, ValueError, "positive"),
        ({"budget_bytes": 0}, ValueError, "positive integer"),
    ],
)
def test_config_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        BayesQConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"block_rows": 6, "pack_multiple": 4}, "not a multiple of pack_multiple=4"),
     ({"mc_samples": 0}, "S must be an integer >= 1"),
     ({"group_size": 0}, "group_size"),
     ({"min_bits": {"fc1": 5}}, "unsupported bit-width 5")],
)
def test_granularity_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BayesQConfig(**kwargs)


def test_options_that_would_be_ignored_are_refused():
    with pytest.raises(ValueError, match="applies to structure='lowrank' only"):
        BayesQConfig(rank=4)
    with pytest.raises(ValueError, match="applies to tables='mc' only"):
        BayesQConfig(mc_refine_top_k=2)
    with pytest.raises(ValueError, match="group_size=16 applies to uniform grids"):
        BayesQConfig(quantizer="nonuniform", group_size=16)
    assert BayesQConfig(quantizer="auto", group_size=16).group_size == 16  # uniform candidates


@pytest.mark.parametrize(("kwargs", "resolved"), [
    ({}, "checked"),  # BayesQ's default: the measured checks
    ({"structure": "diag"}, "checked"),
    ({"score": "posterior_precision"}, "closed_form"),  # units the checks do not share
    ({"method": "hawq"}, "closed_form"),  # the baselines keep their published scores
    ({"method": "gptq"}, "closed_form"),
    ({"method": "adaround"}, "closed_form"),
    ({"tables": "mc"}, "mc"),
])
def test_auto_tables_resolve_per_method(kwargs, resolved):
    cfg = BayesQConfig(**kwargs)
    assert cfg.resolved_tables == resolved
    assert cfg.tables == kwargs.get("tables", "auto")  # stored as given


@pytest.mark.parametrize("method", [m for m, r in METHODS_TABLE.items()
                                    if not r.supports_mc_tables])
@pytest.mark.parametrize("tables", ["mc", "checked"])
def test_task_aware_tables_need_a_method_with_a_posterior(method, tables):
    with pytest.raises(ValueError, match=f"tables='{tables}' scores in the units of the post"):
        BayesQConfig(method=method, tables=tables)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"tables": "checked", "check_inputs": 0}, "check_inputs=0"),
    ({"tables": "checked", "check_top_k": -1}, "check_top_k=-1"),
    ({"check_budget": -0.5}, "check_budget=-0.5"),
    ({"check_budget": float("nan")}, "check_budget=nan"),
    ({"check_budget": True}, "check_budget=True"),
    ({"tables": "checked", "score": "posterior_precision"}, "use score='curvature'"),
])
def test_bad_check_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BayesQConfig(**kwargs)


def test_the_grid_check_alone_takes_any_score():
    cfg = BayesQConfig(tables="checked", score="posterior_precision", check_top_k=0)
    assert cfg.resolved_tables == "checked"


@pytest.mark.parametrize(("field", "choices"), [
    ("method", METHODS), ("structure", STRUCTURES), ("quantizer", QUANTIZERS),
    ("tables", TABLES), ("solver", SOLVERS), ("backend", BACKENDS),
])
def test_every_choice_of_every_option_is_accepted(field, choices):
    """One source per option tuple: the config accepts exactly what the owning module offers."""
    for value in choices:
        extra = {"method": "bayesq"} if field == "tables" else {}
        assert getattr(BayesQConfig(**{field: value, **extra}), field) == value
    with pytest.raises(ValueError, match="not one of"):
        BayesQConfig(**{field: "nonsense"})


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"damp": 0.0}, "damp=0.0 must be a positive finite number"),
    ({"damp": -0.01}, "damp=-0.01 must be a positive"),
    ({"damp": float("inf")}, "damp=inf"),
    ({"posterior_temperature": 0}, "posterior_temperature=0 must be a positive"),
    ({"posterior_temperature": float("nan")}, "posterior_temperature=nan"),
    ({"score": "hessian"}, r"score='hessian' is not one of \('curvature', 'posterior_precision'\)"),
])
def test_scores_damping_and_temperature_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BayesQConfig(**kwargs)


def test_callback_baselines_drop_mc_only_options():
    from bayesq_lightning import BayesQCallback

    cb = BayesQCallback(bits=3.0, tables="mc", mc_refine_top_k=4, compare=("rtn", "hawq"))
    rtn = cb._baseline_config(cb.config, "rtn")
    assert rtn.tables == "closed_form" and rtn.mc_refine_top_k is None
    hawq = cb._baseline_config(cb.config, "hawq")  # hawq has a posterior: MC tables apply
    assert hawq.tables == "mc" and hawq.mc_refine_top_k == 4


# The flat fields in their stored order: reports, resume states and golden fingerprints hold
# ``to_dict()``, so a reordering or renaming changes every stored config.
FLAT_FIELDS = (
    "bits", "budget_bytes", "method", "structure", "quantizer", "tables", "solver", "allowed_bits",
    "calib_batches", "kfac_batches", "n_data", "prior_precision", "include", "exclude", "backend",
    "range_objective", "rank", "group_size", "block_rows", "pack_multiple", "min_bits",
    "max_bits", "per_row_codebook", "mc_samples", "mc_refine_top_k", "score", "damp", "act_order",
    "score_rows", "posterior_temperature", "seed", "adaround_iters", "adaround_batch",
    "check_inputs", "check_top_k", "check_budget", "quantize_embeddings",
)


def test_to_dict_is_flat_in_the_stored_order():
    assert tuple(BayesQConfig().to_dict()) == FLAT_FIELDS
    assert tuple(f.name for f in dataclasses.fields(BayesQConfig)) == FLAT_FIELDS


def test_every_field_is_in_one_group_with_the_same_default():
    grouped = [f.name for _, group in GROUPS for f in dataclasses.fields(group)]
    assert len(grouped) == len(set(grouped))
    assert set(FLAT_FIELDS) - set(grouped) == {"method", "include", "exclude", "seed",
                                                     "quantize_embeddings"}
    cfg = BayesQConfig()
    for key, group in GROUPS:
        assert getattr(cfg, key) == group()  # flat defaults are the groups' defaults


def test_groups_and_flat_arguments_build_the_same_config():
    grouped = BayesQConfig(
        method="hawq",
        posterior=PosteriorOptions(structure="lowrank", rank=4, calib_batches=2),
        grid=GridOptions(quantizer="auto", group_size=16),
        scoring=ScoringOptions(tables="mc", mc_refine_top_k=2),
        allocation=AllocationOptions(bits=2.5, allowed_bits=(4, 2, 2), max_bits={"fc*": 4}),
        rounding=RoundingOptions(damp=0.02),
    )
    flat = BayesQConfig(method="hawq", structure="lowrank", rank=4, calib_batches=2,
                        quantizer="auto", group_size=16, tables="mc", mc_refine_top_k=2,
                        bits=2.5, allowed_bits=(4, 2, 2), max_bits={"fc*": 4}, damp=0.02)
    assert grouped == flat and grouped.to_dict() == flat.to_dict()
    assert grouped.allowed_bits == (2, 4)  # normalised by its group
    assert flat.posterior == PosteriorOptions(structure="lowrank", rank=4, calib_batches=2)
    assert flat.allocation.bits == 2.5 and flat.rounding.damp == 0.02
    with pytest.raises(dataclasses.FrozenInstanceError):
        flat.posterior.structure = "diag"  # a copy: changing it would not change the config


@pytest.mark.parametrize(("args", "kwargs", "match"), [
    ((), {"structure": "diag", "posterior": PosteriorOptions(structure="kron")},
     r"structure is set twice: structure='diag' and posterior=PosteriorOptions\(structure="),
    ((), {"rank": 4, "posterior": PosteriorOptions(structure="lowrank")}, "rank is set twice"),
    ((2.5,), {"allocation": AllocationOptions()}, "bits is set twice: bits=2.5"),
    ((), {"damp": 0.01, "rounding": RoundingOptions()}, "damp is set twice"),
])
def test_a_field_set_by_a_group_and_flat_is_refused(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        BayesQConfig(*args, **kwargs)


def test_a_group_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match="posterior must be a PosteriorOptions, got GridOptions"):
        BayesQConfig(posterior=GridOptions())


@pytest.mark.parametrize(("group", "kwargs", "match"), [
    (PosteriorOptions, {"rank": 2}, "applies to structure='lowrank' only"),
    (PosteriorOptions, {"backend": "jax"}, "not one of"),
    (GridOptions, {"quantizer": "nonuniform", "group_size": 8}, "applies to uniform grids"),
    (ScoringOptions, {"mc_refine_top_k": 2}, "applies to tables='mc' only"),
    (ScoringOptions, {"score_rows": 1}, "score_rows=1 must be an integer >= 2"),
    (AllocationOptions, {"block_rows": 6, "pack_multiple": 4}, "use e.g. block_rows=4"),
    (AllocationOptions, {"max_bits": {1: 4}}, "keys are layer-name patterns"),
    (RoundingOptions, {"damp": -1.0}, r"damp=-1.0 must be a positive finite number \(default 0.01\)"),
])
def test_each_group_validates_its_own_fields(group, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        group(**kwargs)


def test_replace_varies_flat_fields():
    cfg = BayesQConfig(structure="diag", allowed_bits=(2, 4))
    changed = dataclasses.replace(cfg, bits=2.5)
    assert (changed.bits, changed.structure, changed.allowed_bits) == (2.5, "diag", (2, 4))
    assert BayesQConfig(**cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="rank=4 applies to structure='lowrank' only"):
        dataclasses.replace(cfg, rank=4)  # a replaced config is validated again


def test_config_imports_no_algorithm():
    """The config package loads with only ``choices`` and the standard library."""
    root = Path(__file__).resolve().parents[1] / "bayesq_lightning"
    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('bayesq_lightning')\n"
        f"pkg.__path__ = [{str(root)!r}]\n"
        "sys.modules['bayesq_lightning'] = pkg  # skip the package root, which loads everything\n"
        "import bayesq_lightning.config\n"
        "print(' '.join(sys.modules))"
    )
    mods = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                              text=True, timeout=120).stdout.split())
    ours = {m for m in mods if m.split(".")[0] == "bayesq_lightning"}
    assert ours == {"bayesq_lightning", "bayesq_lightning.choices", "bayesq_lightning.config",
                    "bayesq_lightning.config.groups", "bayesq_lightning.config.run"}
    assert "torch" not in mods
