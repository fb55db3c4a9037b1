"""BayesQConfig: every option validated up front, with a message that names the fix."""

from __future__ import annotations

import pytest

from bayesq_lightning import BayesQConfig
from bayesq_lightning.choices import BACKENDS, METHODS, QUANTIZERS, SOLVERS, STRUCTURES, TABLES
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


@pytest.mark.parametrize("method", [m for m, r in METHODS_TABLE.items()
                                    if not r.supports_mc_tables])
def test_mc_tables_need_a_method_with_a_posterior(method):
    with pytest.raises(ValueError, match="tables='mc' samples the posterior"):
        BayesQConfig(method=method, tables="mc")


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
