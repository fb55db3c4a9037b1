"""Golden fingerprints: strict where this environment was recorded, tolerant everywhere.

The cases and the callback run once per module and serve both comparisons; see
``golden_cases`` for what a fingerprint holds, the strict and the tolerant comparison and how
to record. Strictly, everything is compared exactly except the layers' expected losses,
summaries of scores whose products are formed in fp32 (where a kernel's summation order may
differ): to 1e-5 relative, and the weight errors, which the codes' digest already pins: to
1e-12 (float64 summation order). The tolerant comparison runs against every recording of another
environment, so on a recorded machine it is exercised against the other machines' recordings.
"""

from __future__ import annotations

import pytest
from golden_cases import (
    DAMP,
    EXACT_FIELDS,
    FLIP,
    KAPPA,
    NARROW,
    PERTURBED_CASE,
    RHO,
    TOLERANT_SKIPPED,
    deviations,
    environment,
    numbers,
    perturbed_runs,
    recording_here,
    recordings,
    run_callback,
    run_cases,
    run_of,
    spreads,
    tolerant_diff,
)

RECORDINGS = recordings()
GOLDEN = recording_here()
OTHERS = [r for r in RECORDINGS if r["environment"] != environment()]
CHANGES = (DAMP, FLIP, NARROW)

strict = pytest.mark.skipif(
    GOLDEN is None,
    reason=f"strict fingerprints were recorded under {[r['environment'] for r in RECORDINGS]}, "
           f"this is {environment()}: floating-point kernels may round differently (the "
           "tolerant comparison runs); `tests/golden_cases.py --record --keep-weights --add` "
           "records this environment",
)


def _name(recording: dict) -> str:
    env = recording["environment"]
    return f"{env['cpu_vendor']}-{env['cpu_capability']}-torch{env['torch']}"


def _spread(key: str) -> dict[str, float]:
    return spreads([run_of(r, key) for r in RECORDINGS if _holds(r, key)])


def _holds(recording: dict, key: str) -> bool:
    return key == "callback" or key in recording["cases"]


def _shared_keys() -> list[str]:
    """The runs every recording holds."""
    return [k for k in [*RECORDINGS[0]["cases"], "callback"]
            if all(_holds(r, k) for r in RECORDINGS)]


def _value(key: str, path: str) -> float:
    """The value at ``path`` in the first recording that holds it."""
    return next(v[path] for r in RECORDINGS if path in (v := numbers(run_of(r, key))))


@pytest.fixture(scope="module")
def cases() -> dict:
    return run_cases()


@pytest.fixture(scope="module")
def callback() -> dict:
    return run_callback()


@pytest.fixture(scope="module")
def perturbed() -> dict:
    return perturbed_runs()


def _same(got: dict, want: dict) -> bool:
    """Strict: every field ``want`` holds is in ``got`` and equal, the expected losses to 1e-5
    relative and the weight errors (implied by the codes' digest) to float64 summation order."""
    close = {"expected_loss": 1e-5, "weight_error": 1e-12}
    return (want.keys() <= got.keys()
            and all(got[k] == want[k] if k not in close
                    else got[k] == pytest.approx(want[k], rel=close[k], abs=0) for k in want))


@strict
def test_quantize_model_cases_match_golden(cases: dict) -> None:
    assert GOLDEN["cases"].keys() <= cases.keys()  # a recording holds the cases of its time
    diff = [name for name in GOLDEN["cases"] if not _same(cases[name], GOLDEN["cases"][name])]
    assert not diff, {name: (cases[name], GOLDEN["cases"][name]) for name in diff[:2]}


@strict
def test_callback_run_matches_golden(callback: dict) -> None:
    assert _same(callback, GOLDEN["callback"])


@pytest.mark.parametrize("recording", OTHERS, ids=_name)
def test_cases_within_tolerance_of_recording(cases: dict, recording: dict) -> None:
    assert recording["cases"].keys() <= cases.keys()
    bad = {key: diff for key in recording["cases"] if key.split("@")[0] not in TOLERANT_SKIPPED
           and (diff := tolerant_diff(cases[key], recording["cases"][key], _spread(key)))}
    assert not bad, bad


@pytest.mark.parametrize("recording", OTHERS, ids=_name)
def test_callback_within_tolerance_of_recording(callback: dict, recording: dict) -> None:
    assert not tolerant_diff(callback, recording["callback"], _spread("callback"))


def test_unperturbed_case_within_tolerance_of_every_recording(perturbed: dict) -> None:
    key = "{}@{}".format(*PERTURBED_CASE)
    for recording in RECORDINGS:
        assert not tolerant_diff(perturbed["none"], run_of(recording, key), _spread(key))


@pytest.mark.parametrize("change", CHANGES)
def test_small_real_change_fails_the_tolerant_comparison(perturbed: dict, change: str) -> None:
    key = "{}@{}".format(*PERTURBED_CASE)
    assert tolerant_diff(perturbed[change], perturbed["none"], _spread(key))


def test_recordings_agree_on_the_exact_fields() -> None:
    # the tolerant comparison holds these exact: every recorded machine must have agreed
    for key in _shared_keys():
        for field in EXACT_FIELDS:
            assert len({repr(run_of(r, key)[field]) for r in RECORDINGS}) == 1, (key, field)


def test_tolerance_floor_covers_float_noise() -> None:
    # runs with the same codes on every recorded machine differ by summation order alone
    noise = [abs(d) / abs(v) for key in _shared_keys()
             if len({run_of(r, key)["codes_sha256"] for r in RECORDINGS}) == 1
             for path, d in _spread(key).items()
             if (v := _value(key, path)) != 0]
    assert 10 * max(noise, default=0.0) <= RHO


def test_tolerant_comparison_windows() -> None:
    want = {"allocation": [["a", [[[0, 2], 4, "uniform", None]]]], "bits_per_weight": 3.0,
            "expected_loss": [1.0, 2.0], "weight_error": [0.5, 0.5]}
    spread = {"expected_loss[0]": 0.0, "expected_loss[1]": 0.1}
    moved = {**want, "expected_loss": [1.0, 2.0 + 0.99 * KAPPA * 0.1],
             "weight_error": [0.5 * (1 + 0.9 * RHO), 0.9]}
    assert not tolerant_diff(moved, want, spread)  # layer 1's codes moved between machines
    assert tolerant_diff({**want, "expected_loss": [1.0 + 2 * RHO, 2.0]}, want, spread)
    assert tolerant_diff({**want, "weight_error": [0.5 * (1 + 2 * RHO), 0.5]}, want, spread)
    assert tolerant_diff({**want, "bits_per_weight": 3.0 + 1e-12}, want, spread)
    narrowed = [["a", [[[0, 2], 3, "uniform", None]]]]
    assert [p for p, d, w in deviations({**want, "allocation": narrowed}, want, spread)
            if d > w] == ["allocation"]
    assert tolerant_diff({k: v for k, v in want.items() if k != "weight_error"}, want, spread)


def test_expected_losses_are_compared_to_1e_5() -> None:
    want = {"codes_sha256": "x", "expected_loss": [0.25, 1.0]}
    assert _same({"codes_sha256": "x", "expected_loss": [0.25 * (1 + 5e-6), 1.0]}, want)
    assert not _same({"codes_sha256": "x", "expected_loss": [0.25 * (1 + 1e-4), 1.0]}, want)
    assert not _same({"codes_sha256": "y", "expected_loss": [0.25, 1.0]}, want)
    assert not _same({"expected_loss": [0.25, 1.0]}, want)


def test_environment_names_the_cpu_vendor() -> None:
    # MKL rounds differently on AMD and Intel at the same instruction set: the key must say which
    assert environment()["cpu_vendor"] != "" and all(
        "cpu_vendor" in r["environment"] for r in RECORDINGS)
