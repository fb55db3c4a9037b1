"""Effect sizes beside the golden test's tolerance: recorded machines, an emulated one, changes.

The tolerant comparison of ``tests/golden_cases.py`` holds the allocation and the bits per
weight exact and every other value :math:`x` within
:math:`\\max(\\rho |x_{ref}|, \\kappa\\, s(x))`, :math:`s(x)` the range of :math:`x` over the
recordings. Three measurements against it:

1. **Recorded machines.** The largest relative difference between the recordings among runs
   whose codes agree on every recorded machine (float summation order alone: what ``RHO``
   covers, ten times over) and among all runs.
2. **Small real changes** (``golden_cases.perturbed_runs``) of several cases: the field that
   moved most relative to its window (ratio > 1: the tolerant comparison rejects the change).
3. **An emulated other machine.** Every case and the callback rerun in a fresh interpreter with
   AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``,
   ``ONEDNN_MAX_CPU_ISA=AVX2``: another environment, so no strict recording), compared with
   each recording: how many fields fall outside their windows, the largest deviation / window,
   and the largest deviation as a multiple of the recordings' own difference where they
   differ (what ``KAPPA`` covers).

Writes ``benchmarks/results/golden_tolerance.{md,json}``.

Run: ``.venv/bin/python benchmarks/golden_effects.py`` (a few minutes on two cores).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import golden_cases as g  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2"}
# (case, damp used by its method, layers to flip a code in)
CHANGED_CASES = [(("gptq", 3.0), True), (("bayesq_kron", 3.0), True),
                 (("bayesq_diag", 3.0), False)]
LAYERS = ("features.0.0", "features.1.0", "features.3.0", "head.1", "head.3")
RUN_HERE = """
import json, sys
sys.path.insert(0, "tests")
import golden_cases as g
out = {"environment": g.environment(), "cases": g.run_cases(), "callback": g.run_callback()}
open(sys.argv[1], "w").write(json.dumps(out))
"""


def _keys(recs: list[dict]) -> list[str]:
    """The runs the tolerant comparison checks (every case but ``g.TOLERANT_SKIPPED``)."""
    return [k for k in [*recs[0]["cases"], "callback"]
            if k.split("@")[0] not in g.TOLERANT_SKIPPED]


def _rel(d: float, ref: float) -> float:
    return d / abs(ref) if ref else (0.0 if d == 0 else math.inf)


def recorded_machines(recs: list[dict]) -> list[dict]:
    """Largest relative difference between the recordings: same-code runs, and all runs."""
    rows = []
    for label, same_codes in (("runs whose codes agree", True), ("all runs", False)):
        best = (0.0, "-", "-")
        for key in _keys(recs):
            if same_codes and len({g.run_of(r, key)["codes_sha256"] for r in recs}) > 1:
                continue
            ref = {}
            for r in reversed(recs):  # each value from the first recording that holds it
                ref.update(g.numbers(g.run_of(r, key)))
            for path, s in g.spreads([g.run_of(r, key) for r in recs]).items():
                best = max(best, (_rel(s, ref[path]), key, path))
        rows.append({"runs": label, "largest relative difference": best[0], "run": best[1],
                     "field": best[2]})
    return rows


def emulated_machine(recs: list[dict]) -> tuple[dict, list[dict]]:
    """Rerun everything with AVX2 kernels; compare with each recording."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        subprocess.run([sys.executable, "-c", RUN_HERE, str(out)], cwd=ROOT, check=True,
                       env={**os.environ, **AVX2, "PYTHONPATH": str(ROOT)})
        run = json.loads(out.read_text())
    rows = []
    for rec in recs:
        n = outside = 0
        worst, kappa = (0.0, "-", "-"), (0.0, "-", "-")
        for key in _keys(recs):
            spread = g.spreads([g.run_of(r, key) for r in recs])
            for path, d, w in g.deviations(g.run_of(run, key), g.run_of(rec, key), spread):
                n, outside = n + 1, outside + (d > w)
                worst = max(worst, (d / w if w else (0.0 if d == 0 else math.inf), key, path))
                if path not in g.EXACT_FIELDS and spread.get(path, 0.0) > g.RHO * abs(
                        g.numbers(g.run_of(rec, key))[path]):
                    kappa = max(kappa, (d / spread[path], key, path))
        rows.append({"recording": f"{rec['environment']['cpu_vendor']} "
                                  f"{rec['environment']['cpu_capability']}",
                     "fields compared": n, "outside window": outside,
                     "largest deviation / window": worst[0], "at": f"{worst[1]} {worst[2]}",
                     "largest deviation / recordings' difference": kappa[0],
                     "at (kappa)": f"{kappa[1]} {kappa[2]}"})
    return run["environment"], rows


def changes(recs: list[dict]) -> list[dict]:
    """Each small real change of each case: the field that moved most relative to its window."""
    rows = []
    for case, damp in CHANGED_CASES:
        key = "{}@{}".format(*case)
        spread = g.spreads([g.run_of(r, key) for r in recs])
        runs = g.perturbed_runs(case, damp=damp, flip_layers=LAYERS)
        ref = g.numbers(runs["none"])
        for change, fp in runs.items():
            if change == "none":
                continue
            devs = g.deviations(fp, runs["none"], spread)
            path, d, w = max(devs, key=lambda x: (x[1] / x[2] if x[2] else
                                                  (0.0 if x[1] == 0 else math.inf)))
            exact = path in g.EXACT_FIELDS
            rows.append({"case": key, "change": change, "field": path,
                         "deviation": d if exact else _rel(d, ref[path]),
                         "window": w if exact else _rel(w, ref[path]),
                         "rejected": any(d > w for _, d, w in devs)})
    return rows


def _md(rows: list[dict]) -> list[str]:
    cols = list(rows[0])
    cell = {float: lambda v: f"{v:.3g}", bool: lambda v: "yes" if v else "**no**"}
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
            *("| " + " | ".join(cell.get(type(r[c]), str)(r[c]) for c in cols) + " |"
              for r in rows)]


def write(machines: list[dict], changed: list[dict], env: dict | None,
          emulated: list[dict] | None) -> None:
    """``benchmarks/results/golden_tolerance.{md,json}`` (the emulated machine when measured)."""
    recs = g.recordings()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "golden_tolerance.json").write_text(json.dumps(
        {"rho": g.RHO, "kappa": g.KAPPA, "recorded_machines": machines, "changes": changed,
         "emulated_environment": env, "emulated_machine": emulated}, indent=1) + "\n")
    lines = [
        "# Golden tolerance: effect sizes beside the windows",
        "",
        f"Windows: allocation and bits per weight exact; every other value within "
        f"max({g.RHO:g} |x_ref|, {g.KAPPA:g} s(x)), s(x) its range over the recordings "
        f"({', '.join(r['environment']['cpu_vendor'] for r in recs)}); a layer whose expected "
        f"loss differs between the recordings by more than {g.RHO:g} relative is not compared "
        f"(its codes move with the kernels), nor are the cases {', '.join(g.TOLERANT_SKIPPED)}. "
        "Written by `benchmarks/golden_effects.py`.",
        "",
        "## Recorded machines (relative difference between the recordings)",
        "", *_md(machines), "",
        "## Small real changes (deviation and window relative to the unperturbed value; "
        "allocation: blocks that differ; bits per weight: absolute)",
        "", *_md(changed), "",
    ]
    if emulated is not None:
        lines += [f"## Emulated other machine ({env['cpu_vendor']} {env['cpu_capability']} "
                  f"kernels, torch {env['torch']}) against each recording",
                  "", *_md(emulated), ""]
    (RESULTS / "golden_tolerance.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


def main() -> None:
    recs = g.recordings()
    machines = recorded_machines(recs)
    changed = changes(recs)
    write(machines, changed, None, None)
    write(machines, changed, *emulated_machine(recs))


if __name__ == "__main__":
    main()
