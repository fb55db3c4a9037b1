"""Determinism: the same seed, data and thread count give bit-identical artifacts (codes,
metadata and manifest) in two fresh processes.

Reproduce: ``python -m pytest tests/test_determinism.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SCRIPT = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import torch
torch.set_num_threads(1)
from conftest import TinyNet, make_data, train_briefly
from torch.utils.data import DataLoader
from bayesq_lightning import BayesQConfig, quantize_model, save_quantized

out = sys.argv[1]
torch.manual_seed(0)
model = train_briefly(TinyNet(), DataLoader(make_data(256), batch_size=32, shuffle=True))
calib = DataLoader(make_data(64, seed=2), batch_size=32)
for name, extra in (("kron", {{}}), ("mc", {{"tables": "mc", "mc_samples": 2}}),
                    ("gptq", {{"method": "gptq"}})):
    res = quantize_model(model, calib, BayesQConfig(bits=2.5, calib_batches=2, **extra),
                         n_data=256, progress=False)
    save_quantized(res.model, res, f"{{out}}/{{name}}")
"""


def test_two_fresh_processes_write_identical_artifacts(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    for run in ("a", "b"):
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / run)], env=env,
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("kron", "mc", "gptq"):
        for f in ("model.safetensors", "bayesq.json"):  # the manifest names the tensors' sha256
            a = (tmp_path / "a" / name / f).read_bytes()
            assert a == (tmp_path / "b" / name / f).read_bytes(), (name, f)
