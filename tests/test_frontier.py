"""Smoke version of benchmarks/frontier.py: a tiny model, two budgets, every method."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import frontier  # noqa: E402


def test_frontier_smoke(tmp_path):
    budgets = [2.5, 3.0]
    rows = frontier.run_case(frontier.tiny_case(), budgets, list(frontier.METHODS),
                             uniform_gptq=(2,), log=lambda *_: None)
    frontier.write(rows, tmp_path, "frontier", seconds=1.0)
    methods = [r["method"] for r in rows]
    assert methods[0] == "fp32" and methods[-1] == "gptq uniform b2"
    assert len(rows) == 1 + len(frontier.METHODS) * len(budgets) + 1
    for name in frontier.METHODS:
        mine = [r for r in rows if r["method"] == name]
        assert [r["bits"] for r in mine] == budgets
        for r in mine:  # the budget holds, metadata included, and every metric is finite
            assert r["bits_per_weight"] <= r["bits"] + 1e-9
            assert all(math.isfinite(r[k]) for k in ("accuracy", "nll", "ece", "accuracy_se",
                                                      "d_gptq", "d_gptq_se", "prep_s"))
            assert 0 <= r["accuracy"] <= 1
    gptq = [r for r in rows if r["method"] == "gptq"]
    assert all(r["d_gptq"] == 0 and r["d_gptq_se"] == 0 for r in gptq)
    default = [r for r in rows if r["method"] == "bayesq kron"]
    assert all(r["d_bayesq"] == 0 and r["d_bayesq_se"] == 0 for r in default)
    assert default[-1]["d_gptq3"] == default[-1]["d_gptq"]  # at 3.0 bits: GPTQ at 3.0 itself
    assert all(math.isfinite(r["d_gptq3_se"]) for r in default)
    assert all(math.isfinite(r["d_bayesq_se"]) for r in rows if r["method"] == "adaround")
    saved = json.loads((tmp_path / "frontier.json").read_text())
    assert len(saved["rows"]) == len(rows)
    table = (tmp_path / "frontier.md").read_text()
    assert frontier.markdown(rows).count("\n| ") == len(rows) + 1  # header + one per row
    wide = frontier.pivot(rows)  # one line per method, one column per budget
    assert wide.count("\n| ") == len(frontier.METHODS) + 1 and wide in table
    assert "| bayesq kron | " in wide and wide.count(" ± ") >= len(budgets) * 2
    assert (tmp_path / "frontier.png").stat().st_size > 10_000


def test_update_replaces_only_the_rows_run():
    def row(method, bits, acc):
        return {"case": "c", "method": method, "bits": bits, "accuracy": acc}

    old = {"seconds": 10.0, "threads": 2,
           "rows": [row("fp32", 32.0, 0.9), row("gptq", 2.5, 0.8), row("adaround", 2.5, 0.81),
                    row("mc", 2.5, 0.7), row("mc", 3.0, 0.7)]}
    new = [row("fp32", 32.0, 0.9), row("gptq", 2.5, 0.8), row("mc", 3.0, 0.75),
           row("mc", 4.0, 0.76)]
    rows, meta = frontier.merged(old, new, seconds=3.0)
    assert [(r["method"], r["bits"], r["accuracy"]) for r in rows] == [
        ("fp32", 32.0, 0.9), ("gptq", 2.5, 0.8), ("adaround", 2.5, 0.81), ("mc", 2.5, 0.7),
        ("mc", 3.0, 0.75), ("mc", 4.0, 0.76)]
    assert meta["seconds"] == 10.0 and meta["threads"] == 2
    assert [u["methods"] for u in meta["updates"]] == [["fp32", "gptq", "mc"]]


def test_update_refuses_to_run_without_its_references(tmp_path, capsys):
    with pytest.raises(SystemExit):
        frontier.main(["--cases", "tiny", "--methods", "bayesq kron mc", "--update",
                       "--out", str(tmp_path)])
    assert "--update needs --methods with gptq" in capsys.readouterr().err


def test_update_refuses_a_retrained_model():
    stored = {"rows": [{"case": "c", "method": "fp32", "bits": 32.0, "accuracy": 0.9,
                        "nll": 0.3}]}
    assert frontier.model_changed(stored, "c", {"accuracy": 0.9, "nll": 0.3}) is None
    assert "retrained" in frontier.model_changed(stored, "c", {"accuracy": 0.88, "nll": 0.3})
    assert "no FP32 row" in frontier.model_changed(stored, "other", {"accuracy": 0.9, "nll": 0.3})
