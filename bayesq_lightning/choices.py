"""The values every option of a run may take: plain data, importing nothing.

:mod:`~bayesq_lightning.config` validates against these without importing an algorithm, and
each algorithm module checks its own inputs against the same tuples.
"""

from __future__ import annotations

METHODS = ("bayesq", "rtn", "gptq", "hawq", "mse", "adaround")
POSTERIOR_METHODS = ("bayesq", "hawq")  # the methods that fit a posterior (tables="mc" samples it)
STRUCTURES = ("diag", "kron", "lowrank")  # posterior covariance
BACKENDS = ("auto", "asdl", "asdl_stochastic", "curvlinops")  # curvature backend
QUANTIZERS = ("uniform", "nonuniform", "auto")
# "auto": "checked" for method="bayesq" under score="curvature", else "closed_form"
# (BayesQConfig.resolved_tables); each method's score; Monte-Carlo KL; closed form with measured
# substitution losses where it is weakest (bayesq_lightning.checks)
TABLES = ("auto", "closed_form", "mc", "checked")
SOLVERS = ("greedy", "dp")
SCORES = ("curvature", "posterior_precision")
# What a grid's range (or a codebook) is designed to minimise. "minmax": no search, the
# weights' own range; "deployed": the weighted error of the stored weights; "expected": the
# posterior-expected distortion. "auto" is a run-level choice (BayesQConfig.range_objective)
# that tries "minmax" and "deployed" for blocks rounded by error feedback.
RANGE_OBJECTIVES = ("auto", "minmax", "deployed", "expected")
SEARCHED_RANGES = ("deployed", "expected")  # the objectives a design search minimises
SUPPORTED_BITS = (2, 3, 4, 8)  # widths packed storage holds


def check_bits(bits: int) -> int:
    """Validate one bit-width against what packing supports."""
    if isinstance(bits, bool) or int(bits) != bits or int(bits) not in SUPPORTED_BITS:
        raise ValueError(
            f"unsupported bit-width {bits!r}: packed storage supports {SUPPORTED_BITS}; "
            f"choose allowed_bits from that set"
        )
    return int(bits)
