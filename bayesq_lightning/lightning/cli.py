r"""The ``bayesq`` command: ``LightningCLI`` with ``quantize`` and ``distill`` beside ``fit``.

.. code-block:: bash

    bayesq fit      --config configs/digits_cnn.yaml                    # train; BayesQ at the end
    bayesq quantize --config configs/digits_cnn.yaml --ckpt_path m.ckpt # a checkpoint you have
    bayesq distill  --config configs/digits_cnn.yaml --ckpt_path m.ckpt # quantize, then distil
    # options: --bayesq.config.bits 2.5, --distillation.epochs 5, ...

The BayesQ options are the ``bayesq`` group (:class:`~bayesq_lightning.BayesQCallback`, with its
``config`` a :class:`~bayesq_lightning.BayesQConfig`), attached to the Trainer of every
subcommand. ``quantize`` and ``distill`` are methods of :class:`BayesQTrainer`, so their options
come from those methods' signatures (LightningCLI's custom-subcommand pattern). A ``ckpt_path``
makes LightningCLI read only the checkpoint's hyperparameters; both methods load the weights
themselves. They run no Trainer stage that would save the config, so they write
``config.yaml`` next to their outputs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from ..distillation.config import DistillConfig
from ..report import plot_allocation
from .callback import BayesQCallback, calibration_data
from .distill import distill_callback_result

DESCRIPTION = ("BayesQ: uncertainty-guided mixed-precision quantization of PyTorch Lightning "
               "models (fit, quantize, distill).")
DISTILL_DEFAULTS = DistillConfig()  # never modified
OUTPUTS = ("model.safetensors", "bayesq.json", "report.json", "allocation.png", "config.yaml")


def load_checkpoint_weights(model: torch.nn.Module, ckpt_path: str | Path) -> None:
    """Load a Lightning checkpoint's ``state_dict`` into ``model`` (strict), or say why not."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; pass the .ckpt file "
                                "written by `bayesq fit` (or any Lightning checkpoint)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure: not a checkpoint this tool can read
        raise ValueError(f"{str(path)!r} is not a readable Lightning checkpoint ({exc})") from exc
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} has no 'state_dict'; is it a Lightning checkpoint?")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint {str(path)!r} was saved from a different model than "
            f"{type(model).__name__} as configured: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatch {shapes[:5]} (first 5 of each); pass the model "
            "config the checkpoint was trained with"
        )
    model.load_state_dict(state)


class BayesQTrainer(pl.Trainer):
    """A ``Trainer`` with ``quantize`` and ``distill`` (the ``bayesq`` command's subcommands)."""

    def _bayesq_callback(self) -> BayesQCallback:
        for cb in self.callbacks:
            if isinstance(cb, BayesQCallback):
                return cb
        raise ValueError("no BayesQCallback among the trainer's callbacks; add one (the "
                         "`bayesq` config group)")

    def quantize(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
                 ckpt_path: str | None = None, output_dir: str | None = None) -> dict[str, Any]:
        """Quantize a trained model: evaluate, quantize, evaluate, export, report and plot.

        Args:
            model: the configured model; its weights come from ``ckpt_path``.
            datamodule: provides the calibration hold-out and the evaluation split.
            ckpt_path: the trained checkpoint (its weights are loaded; required).
            output_dir: where the artifact, ``report.json``, ``allocation.png`` and
                ``config.yaml`` go (default: the ``bayesq.export_dir`` option, else
                ``bayesq_out`` next to the checkpoint).
        """
        return self._quantize(model, datamodule, ckpt_path, output_dir, None)

    def distill(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
                ckpt_path: str | None = None, output_dir: str | None = None,
                distillation: DistillConfig = DISTILL_DEFAULTS) -> dict[str, Any]:
        """Quantize a trained model, then distil it toward the posterior predictive.

        Distillation uses only the calibration inputs; the report holds the evaluation split's
        accuracy / NLL / ECE of the FP32, quantized and distilled models and of the teacher.

        Args:
            model: the configured model; its weights come from ``ckpt_path``.
            datamodule: provides the calibration hold-out and the evaluation split.
            ckpt_path: the trained checkpoint (its weights are loaded; required).
            output_dir: as for ``quantize``; the artifact holds the distilled model.
            distillation: the distillation options (:class:`~bayesq_lightning.DistillConfig`).
        """
        return self._quantize(model, datamodule, ckpt_path, output_dir, distillation)

    def _quantize(self, model, datamodule, ckpt_path, output_dir, distill_config
                  ) -> dict[str, Any]:
        cb = self._bayesq_callback()
        if self.num_devices * self.num_nodes > 1:
            raise ValueError("bayesq quantize / distill run in one process (devices=1); "
                             "multi-device quantization happens at the end of `bayesq fit`")
        if ckpt_path is None:
            raise ValueError("--ckpt_path is required: the checkpoint whose weights to quantize "
                             "(`bayesq fit` writes one under lightning_logs/)")
        if datamodule is None:
            raise ValueError("a datamodule is required (calibration and evaluation data); set "
                             "`data:` in the config")
        out = Path(output_dir or cb.export_dir or Path(ckpt_path).parent / "bayesq_out")
        load_checkpoint_weights(model, ckpt_path)
        model.eval()
        t0 = time.perf_counter()
        datamodule.setup("fit")
        train = datamodule.train_dataloader()
        calib, n_data = calibration_data(cb.config, datamodule, train)
        val = datamodule.val_dataloader() if cb.evaluate else None
        cb.export_dir = out
        result = cb.quantize_module(model, calib, n_data, val)
        report = {"checkpoint": str(ckpt_path), **cb.report,
                  "seconds": {"quantize": time.perf_counter() - t0}}
        if distill_config is not None:
            t1 = time.perf_counter()
            rep = distill_callback_result(self, cb, model, distill_config,
                                          enable_progress_bar=self.progress_bar_callback
                                          is not None)
            report.update({k: v for k, v in cb.report.items() if k in ("distilled", "teacher",
                                                                     "distill")})
            report["seconds"]["distill"] = time.perf_counter() - t1
            report["seconds_per_epoch"] = rep["seconds_per_epoch"]  # artifact: re-exported
        report["allocation"] = result.table()
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
        plot_allocation({"bayesq": result}, out / "allocation.png",
                        title=f"{type(model).__name__}: {result.bits_per_weight:.3f} bits/weight")
        self.bayesq_output_dir = out
        rank_zero_info("BayesQ allocation\n" + result.table())
        rank_zero_info(f"BayesQ: wrote {', '.join(OUTPUTS)} to {out}")
        summary = {k: report[k] for k in ("fp32", "quantized", "distilled") if k in report}
        rank_zero_info(json.dumps(summary, indent=1))
        return report


class BayesQCLI(LightningCLI):
    """``LightningCLI`` with the ``quantize`` and ``distill`` subcommands and the ``bayesq``
    callback group."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_class", BayesQTrainer)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION})
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "quantize": {"model", "datamodule"},
                "distill": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(BayesQCallback, "bayesq")

    def _save_own_config(self) -> None:
        out = getattr(self.trainer, "bayesq_output_dir", None)
        if out is not None and self.trainer.is_global_zero:
            self._parser(self.subcommand).save(self.config[self.subcommand],
                                               Path(out) / "config.yaml", skip_none=False,
                                               overwrite=True, multifile=False)

    def after_quantize(self) -> None:
        self._save_own_config()

    def after_distill(self) -> None:
        self._save_own_config()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``bayesq`` console script."""
    kwargs = {} if argv is None else {"args": argv}
    BayesQCLI(pl.LightningModule, pl.LightningDataModule, **kwargs)
