"""The core does not import Lightning; the shells still load from the package root."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    return set(out.split())


def test_core_import_does_not_import_lightning():
    mods = _modules_after("from bayesq_lightning import quantize_model, load_quantized, "
                          "save_quantized, BayesQConfig")
    assert "bayesq_lightning" in mods
    assert not {m for m in mods if m == "lightning" or m.startswith("lightning.")}
    assert "pytorch_lightning" not in mods


def test_callback_still_loads_from_the_package_root():
    mods = _modules_after("from bayesq_lightning import BayesQCallback\n"
                          "assert BayesQCallback.__module__ == 'bayesq_lightning.lightning.callback'")
    assert "lightning.pytorch" in mods
