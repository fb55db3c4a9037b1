"""Standalone 2-process CPU DDP run of BayesQCallback (run by tests/test_ddp.py via subprocess).

Lightning's DDP launcher re-runs this command in each child, so it must not live inside pytest.
Each rank writes what it ended with to OUT/rank<r>.safetensors; rank 0 also writes the FP32
weights the posterior was fitted on and the calibration batches it used, so the test can refit
in a single process and compare.

    python tests/ddp/run_callback.py OUT [method] [structure] [tables]
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TinyNet, make_data  # noqa: E402

from bayesq_lightning import BayesQCallback  # noqa: E402


class SaveFP32(pl.Callback):
    """Runs before BayesQCallback: keeps the trained FP32 weights for the reference fit."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            state = {k: v.detach().cpu().contiguous() for k, v in pl_module.state_dict().items()}
            save_file(state, self.out / "fp32.safetensors")


def main() -> None:
    out = Path(sys.argv[1])
    method = sys.argv[2] if len(sys.argv) > 2 else "bayesq"
    structure = sys.argv[3] if len(sys.argv) > 3 else "kron"
    tables = sys.argv[4] if len(sys.argv) > 4 else "auto"
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0)
    torch.set_num_threads(1)
    model = TinyNet()
    train = DataLoader(make_data(256, seed=0), batch_size=32, shuffle=True)
    cb = BayesQCallback(bits=3.0, method=method, structure=structure, calib_batches=6,
                        progress=False, evaluate=False, block_rows=16, tables=tables)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=2,
        callbacks=[SaveFP32(out), cb], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, train)
    rank = trainer.global_rank
    res = cb.result
    tensors = {f"q.{x.name}": dict(model.named_modules())[x.name].weight.detach().contiguous()
               for x in res.layers}
    if res.posterior is not None:
        tensors.update({f"precision.{n}": lp.precision.contiguous()
                        for n, lp in res.posterior.layers.items()})
    tensors["bits"] = torch.tensor([b.bits for x in res.layers for b in x.blocks])
    tensors["n_calib"] = torch.tensor(res.info.get("n_calib", -1))
    tensors["n_data"] = torch.tensor(res.info.get("n_data", -1))
    tensors["checked"] = torch.tensor(res.info.get("checked_candidates", -1))
    # the posterior's delta, solved on this read (the factors are combined: no collective)
    tensors["prior_precision"] = torch.tensor(
        res.posterior.prior_precision if res.posterior is not None else -1.0)
    save_file(tensors, out / f"rank{rank}.safetensors")


if __name__ == "__main__":
    main()
