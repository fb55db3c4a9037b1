"""The reorganised package reproduces the pre-reorganisation runs bit for bit (issue 8).

Fingerprints (allocation, codes and metadata, artifact bytes, metrics) were recorded by
``tests/golden_cases.py --record`` on the commit before the move; see that module.
"""

from __future__ import annotations

import json

import pytest
from golden_cases import FINGERPRINTS, environment, run_callback, run_cases

GOLDEN = json.loads(FINGERPRINTS.read_text())
pytestmark = pytest.mark.skipif(
    GOLDEN["environment"] != environment(),
    reason=f"fingerprints were recorded under {GOLDEN['environment']}, this is {environment()}: "
           "floating-point kernels may round differently; re-record to compare here",
)


def test_quantize_model_cases_match_golden() -> None:
    got = run_cases()
    assert got.keys() == GOLDEN["cases"].keys()
    diff = [name for name in got if got[name] != GOLDEN["cases"][name]]
    assert not diff, {name: (got[name], GOLDEN["cases"][name]) for name in diff[:2]}


def test_callback_run_matches_golden() -> None:
    assert run_callback() == GOLDEN["callback"]
