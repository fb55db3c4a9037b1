"""The scaling benchmark's smoke version: tiny models, each run in a fresh process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import scale  # noqa: E402


def test_scale_smoke(tmp_path):
    rows = scale.main(["--smoke", "--methods", "gptq", "kron", "--out", str(tmp_path)])
    assert {(r["model"], r["method"]) for r in rows} == {
        (m, k) for m in ("tiny-cnn", "bert-tiny") for k in ("gptq", "kron")}
    for r in rows:
        assert r["seconds"] > 0 and r["peak_rss_gb"] > 0 and r["params"] > 0, r
        assert r["time_vs_gptq"] > 0 and r["memory_vs_gptq"] > 0
    saved = json.loads((tmp_path / "scale_smoke_runs.json").read_text())
    assert len(saved["rows"]) == 4 and (tmp_path / "scale_smoke.png").stat().st_size > 0
