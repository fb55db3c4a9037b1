"""Standalone 2-process CPU DDP run: BayesQCallback, then ``distill`` on a fresh Trainer.

Run by tests/test_lightning_distill.py via subprocess (Lightning's DDP launcher re-runs this
command in each child, so it must not live inside pytest). Each rank writes its distilled
student to OUT/rank<r>.safetensors; rank 0 also writes the artifact and the metrics of the last
validation epoch (computed on the ranks' shards and synced) to OUT/rank0.json.

    python tests/ddp/run_distill.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TinyData, TinyNet  # noqa: E402

from bayesq_lightning import BayesQCallback, DistillConfig, distill, save_quantized  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0)
    torch.set_num_threads(1)
    model = TinyNet()
    cb = BayesQCallback(bits=2.5, calib_batches=4, progress=False, evaluate=True)
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
             "enable_model_summary": False}
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1,
                         limit_train_batches=2, callbacks=[cb], **quiet)
    trainer.fit(model, TinyData())  # validation: 128 samples, divisible by 2 (no padding)
    # the defaults' step size and cross-fitting, and the temperature: every broadcast runs
    rep = distill(trainer, cb, DistillConfig(epochs=2, fit_temperature=True),
                  enable_model_summary=False)
    rank = trainer.global_rank
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / f"rank{rank}.safetensors")
    if rank == 0:
        save_quantized(model, cb.result, out / "artifact")
        (out / "rank0.json").write_text(json.dumps(rep["logged"]))


if __name__ == "__main__":
    main()
