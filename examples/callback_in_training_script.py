"""Add BayesQ to an existing Lightning training script: one callback, then optional distillation.

The script below is an ordinary Lightning run (a small CNN on scikit-learn's digits); the lines
marked ``# BayesQ`` are all that quantization and distillation add.

    python examples/callback_in_training_script.py          (about 30 s on 2 CPU cores)
"""

from __future__ import annotations

import lightning.pytorch as pl

from bayesq_lightning import BayesQCallback, DistillConfig, distill, save_quantized  # BayesQ
from bayesq_lightning.lightning.data import DigitsDataModule
from bayesq_lightning.lightning.models import DigitsCNN


def main() -> None:
    pl.seed_everything(0)
    model = DigitsCNN(channels=(8, 16, 32), hidden=32)
    datamodule = DigitsDataModule(batch_size=64)  # defines calibration_dataloader(): a hold-out
    bayesq = BayesQCallback(bits=2.5, compare=("gptq",))  # BayesQ
    trainer = pl.Trainer(max_epochs=15, accelerator="cpu", devices=1, callbacks=[bayesq],
                         logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule)  # at the end: posterior -> tables -> knapsack -> packed model

    distill(trainer, bayesq, DistillConfig(epochs=5))  # BayesQ: a second fit, inputs only
    save_quantized(model, bayesq.result, "artifacts/example_callback", overwrite=True)  # BayesQ

    print(bayesq.result.table())
    for key in ("fp32", "quantized", "distilled"):
        print(key, {k: round(v, 4) for k, v in bayesq.report[key].items()})
    print("gptq", {k: round(v, 4) for k, v in bayesq.report["baselines"]["gptq"].items()})


if __name__ == "__main__":
    main()
