"""Golden fixtures: bit-exact fingerprints of quantization runs on a trained digits CNN.

First recorded on the commit before the package was reorganised (issue 8, "a move, not a
rewrite"; the reorganised code reproduced them bit for bit), then re-recorded when the
scores became curvature-only with relative damping (issue 9, an intended change) and when the
prior precision became the exact marginal-likelihood optimum instead of laplace-torch's 100
Adam steps, K-FAC's factors were summed in one curvlinops operator rather than per batch (the
factors moved by 1e-7 relative) and GPTQ's input statistics took each batch's product in fp32
as GPTQ does (issue 14: the K-FAC, Monte-Carlo and GPTQ cases changed). Compared by
``tests/test_golden.py``. The trained weights are stored beside the
fingerprints (``tests/golden/digits_cnn.safetensors``) so that training noise never enters.

Record (only when a change of behaviour is intended, and say so in the commit)::

    .venv/bin/python tests/golden_cases.py --record

Fingerprints are exact on one machine and torch build; another CPU's floating-point kernels may
round differently (MKL takes other code paths on AMD than on Intel at the same instruction set),
so the file holds one recording per environment (torch, architecture, instruction set, CPU
vendor) and the test compares against the recording of its own, skipping (and saying why) where
there is none. ``--record`` replaces every recording with this environment's (the intended change
cannot be checked elsewhere); ``--record --add`` adds or replaces only this environment's, for a
new kind of machine where nothing changed (check that the other recordings still pass first).
The first recording's vendor was not stored; it is GenuineIntel by inference: CI and the
machines of the sessions that recorded it reproduced it, an AuthenticAMD machine does not.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset

HERE = Path(__file__).parent / "golden"
WEIGHTS = HERE / "digits_cnn.safetensors"
FINGERPRINTS = HERE / "fingerprints.json"
BUDGETS = (2.5, 3.0)

# name -> BayesQConfig fields (besides bits; "budgets" overrides BUDGETS, e.g. where group
# metadata alone costs 2 bits/weight); posteriors are fitted once per name and reused
# across budgets, as a user sweeping budgets would.
CASES: dict[str, dict] = {
    "rtn": {"method": "rtn"},
    "mse": {"method": "mse"},
    "gptq": {"method": "gptq"},
    "gptq_groups_blocks": {"method": "gptq", "group_size": 16, "block_rows": 16,
                           "budgets": (4.25, 4.5)},
    "hawq": {"method": "hawq"},
    "bayesq_diag": {"structure": "diag"},
    "bayesq_diag_expected": {"structure": "diag", "range_objective": "expected"},
    "bayesq_kron": {"structure": "kron"},
    "bayesq_lowrank": {"structure": "lowrank", "rank": 2},
    "bayesq_kron_mc": {"structure": "kron", "tables": "mc", "mc_samples": 2,
                       "mc_refine_top_k": 3},
    "bayesq_diag_mc": {"structure": "diag", "tables": "mc", "mc_samples": 2},
    "bayesq_kron_auto": {"structure": "kron", "quantizer": "auto"},
    "bayesq_kron_nonuniform": {"structure": "kron", "quantizer": "nonuniform"},
    "bayesq_diag_nonuniform_per_row": {"structure": "diag", "quantizer": "nonuniform",
                                       "per_row_codebook": True},
    "bayesq_kron_group16": {"structure": "kron", "group_size": 16, "budgets": (4.25, 4.5)},
    "bayesq_kron_blocks16": {"structure": "kron", "block_rows": 16},
    "bayesq_kron_dp_pins": {"structure": "kron", "solver": "dp",
                            "min_bits": {"features.0.*": 8}, "allowed_bits": (2, 3, 4, 8)},
}


def environment() -> dict:
    """What the fingerprints depend on besides the code."""
    return {"torch": torch.__version__, "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_vendor": cpu_vendor()}


def cpu_vendor() -> str:
    """``vendor_id`` of ``/proc/cpuinfo`` (e.g. GenuineIntel, AuthenticAMD), else "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def recordings() -> list[dict]:
    """Every stored recording: ``{"environment", "cases", "callback"}``."""
    return json.loads(FINGERPRINTS.read_text())["recordings"]


def recording_here() -> dict | None:
    """The recording made in this environment, if any."""
    env = environment()
    return next((r for r in recordings() if r["environment"] == env), None)


def _digits():
    try:
        from bayesq_lightning.lightning.data import DigitsDataModule
    except ImportError:
        from bayesq_lightning.lightning.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    return dm


def _model():
    try:
        from bayesq_lightning.lightning.models import DigitsCNN
    except ImportError:
        from bayesq_lightning.lightning.models import DigitsCNN

    torch.manual_seed(0)
    return DigitsCNN()


def train_weights() -> dict[str, torch.Tensor]:
    """A few epochs of plain-loop training (recording only; the test loads the stored file)."""
    dm = _digits()
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(4):
        for x, y in dm.train_dataloader():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def trained_model():
    model = _model()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return model.eval()


def calibration_loader() -> DataLoader:
    dm = _digits()
    return DataLoader(Subset(dm.train_set, list(range(128))), batch_size=64)


def _sha(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
        else:
            h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                     if t.numel() else b"")
    return h.hexdigest()


def fingerprint(result, model_for_artifact, workdir: Path) -> dict:
    """Allocation, codes + metadata and artifact hashes of one result, plus its metrics."""
    from bayesq_lightning import save_quantized

    allocation = [[x.name, [[list(b.rows), b.bits, b.quantizer, b.group_size] for b in x.blocks]]
                  for x in result.layers]
    codes = _sha(*[t for x in result.layers for b in x.blocks
                   for t in (b.codes, b.scale, b.zero, b.codebook)])
    save_quantized(model_for_artifact, result, workdir)
    manifest = json.loads((workdir / "bayesq.json").read_text())
    return {
        "allocation": allocation,
        "codes_sha256": codes,
        # every stored tensor's bytes; not the file, whose header names library versions
        "artifact_tensors_sha256": manifest["tensors_sha256"],
        "manifest_layers_sha256": hashlib.sha256(
            json.dumps(manifest["layers"], sort_keys=True).encode()).hexdigest(),
        "bits_per_weight": result.bits_per_weight,
        "expected_loss": [x.expected_loss for x in result.layers],
    }


def run_cases(names=None) -> dict:
    from bayesq_lightning import BayesQConfig, quantize_model

    torch.set_num_threads(2)
    out: dict = {}
    model = trained_model()
    loader = calibration_loader()
    with tempfile.TemporaryDirectory() as tmp:
        for name, fields in CASES.items():
            if names is not None and name not in names:
                continue
            fields = dict(fields)
            posterior = None
            for bits in fields.pop("budgets", BUDGETS):
                cfg = BayesQConfig(bits=bits, calib_batches=2, **fields)
                res = quantize_model(model, loader, cfg, n_data=1437, progress=False,
                                     posterior=posterior)
                posterior = res.posterior
                out[f"{name}@{bits}"] = fingerprint(res, res.model, Path(tmp) / name)
    return out


def run_callback() -> dict:
    """One ``BayesQCallback`` run: one epoch from the stored weights, 3.0 bits, RTN compared."""
    import lightning.pytorch as pl

    from bayesq_lightning import BayesQCallback

    torch.set_num_threads(2)
    pl.seed_everything(0, verbose=False)
    model = trained_model()
    dm = _digits()
    with tempfile.TemporaryDirectory() as tmp:
        cb = BayesQCallback(bits=3.0, compare=("rtn",), calib_batches=2, export_dir=tmp,
                            progress=False)
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=4, callbacks=[cb], logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu", devices=1)
        trainer.fit(model, dm)
        fp = fingerprint(cb.result, model, Path(tmp))
    fp["report"] = {k: cb.report[k] for k in ("fp32", "quantized", "baselines")}
    fp["rtn_codes_sha256"] = fingerprint(cb.baselines["rtn"], cb.baselines["rtn"].model,
                                         Path(tempfile.mkdtemp()))["codes_sha256"]
    return fp


def record(retrain: bool = True, add: bool = False) -> None:
    """Re-record the fingerprints; ``retrain=False`` (``--keep-weights``) keeps the stored
    weights, e.g. after an intended artifact format change, so only what changed moves.
    ``add=True`` keeps the other environments' recordings (new weights void them)."""
    HERE.mkdir(exist_ok=True)
    if retrain:
        save_file(train_weights(), str(WEIGHTS))
    here = {"environment": environment(), "cases": run_cases(), "callback": run_callback()}
    others = [r for r in recordings() if r["environment"] != here["environment"]] \
        if add and not retrain and FINGERPRINTS.exists() else []
    FINGERPRINTS.write_text(json.dumps({"recordings": [*others, here]}, indent=1) + "\n")
    print(f"wrote {FINGERPRINTS}: {len(here['cases'])} cases + callback for "
          f"{here['environment']}; {len(others)} other recording(s) kept")


if __name__ == "__main__":
    if "--record" in sys.argv:
        record(retrain="--keep-weights" not in sys.argv, add="--add" in sys.argv)
    else:
        print(__doc__)
