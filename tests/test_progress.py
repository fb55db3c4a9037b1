"""Progress bars are drawn on a terminal only: no bar noise in logs and CI output."""

from __future__ import annotations

import io
import sys

import pytest

from bayesq_lightning import BayesQConfig, quantize_model
from bayesq_lightning.progress import on_terminal


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [False, True])
def test_bars_only_on_a_terminal(trained, loader, monkeypatch, tty):
    err = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", err)
    assert on_terminal() is tty
    quantize_model(trained, loader, BayesQConfig(method="rtn", bits=4.0), progress=True)
    assert ("bayesq candidates" in err.getvalue()) is tty
