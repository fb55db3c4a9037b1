"""Multi-process curvature: a 2-process CPU DDP run agrees with a single process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TinyNet, make_data
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Subset

from bayesq_lightning import BayesQConfig, quantize_model

SCRIPT = Path(__file__).parent / "ddp" / "run_callback.py"


def _run(out: Path, method: str, structure: str, tables: str = "closed_form"
         ) -> tuple[dict, dict, dict]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), method, structure, tables],
                          env=env,
                          check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return (load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors"),
            load_file(out / "fp32.safetensors"))


def _reference(fp32: dict, method: str, structure: str):
    """The same fit in one process: all 6 calibration batches the callback drew."""
    model = TinyNet()
    model.load_state_dict(fp32)
    train = make_data(256, seed=0)
    idx = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:6 * 32].tolist()
    calib = DataLoader(Subset(train, idx), batch_size=32)
    cfg = BayesQConfig(bits=3.0, method=method, structure=structure, calib_batches=6,
                       block_rows=16, tables="closed_form")
    return quantize_model(model.eval(), calib, cfg, n_data=256, progress=False)


@pytest.mark.parametrize(("method", "structure"),
                         [("bayesq", "kron"), ("bayesq", "diag"), ("gptq", "kron")])
def test_two_process_ddp_matches_single_process(tmp_path, method, structure):
    r0, r1, fp32 = _run(tmp_path, method, structure)
    # every rank ends with the same allocation and identical quantized weights
    assert torch.equal(r0["bits"], r1["bits"])
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    ref = _reference(fp32, method, structure)
    assert r0["bits"].tolist() == [b.bits for x in ref.layers for b in x.blocks]
    if method == "bayesq":
        assert int(r0["n_calib"]) == 192 and int(r0["n_data"]) == 256  # no padded sample
        for name, lp in ref.posterior.layers.items():
            torch.testing.assert_close(r0[f"precision.{name}"], lp.precision, rtol=1e-5,
                                       atol=0)
        assert float(r0["prior_precision"]) == pytest.approx(ref.posterior.prior_precision,
                                                             rel=1e-4)
    modules = dict(ref.model.named_modules())
    for x in ref.layers:
        torch.testing.assert_close(r0[f"q.{x.name}"], modules[x.name].weight, rtol=1e-5,
                                   atol=1e-6)



def test_two_process_ddp_checks_agree_across_ranks(tmp_path):
    """The default checks (``tables="auto"``) measure on every rank's inputs and sum: both
    ranks end with the same allocation and weights, within the budget."""
    r0, r1, _ = _run(tmp_path, "bayesq", "kron", "auto")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert set(r0["bits"].tolist()) <= {2, 3, 4, 8}
    assert int(r0["checked"]) > 0
