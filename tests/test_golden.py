"""The reorganised package reproduces the pre-reorganisation runs bit for bit (issue 8).

Fingerprints (allocation, codes and metadata, artifact bytes, metrics) were recorded by
``tests/golden_cases.py --record`` on the commit before the move; see that module.
"""

from __future__ import annotations

import pytest
from golden_cases import environment, recording_here, recordings, run_callback, run_cases

GOLDEN = recording_here()
pytestmark = pytest.mark.skipif(
    GOLDEN is None,
    reason=f"fingerprints were recorded under {[r['environment'] for r in recordings()]}, this is "
           f"{environment()}: floating-point kernels may round differently; "
           "`tests/golden_cases.py --record --add` records this environment",
)


def test_quantize_model_cases_match_golden() -> None:
    got = run_cases()
    assert got.keys() == GOLDEN["cases"].keys()
    diff = [name for name in got if got[name] != GOLDEN["cases"][name]]
    assert not diff, {name: (got[name], GOLDEN["cases"][name]) for name in diff[:2]}


def test_callback_run_matches_golden() -> None:
    assert run_callback() == GOLDEN["callback"]


def test_environment_names_the_cpu_vendor() -> None:
    # MKL rounds differently on AMD and Intel at the same instruction set: the key must say which
    assert environment()["cpu_vendor"] != "" and all(
        "cpu_vendor" in r["environment"] for r in recordings())
