r"""The ``bayesq`` command: ``LightningCLI`` with ``quantize`` and ``distill`` beside ``fit``.

.. code-block:: bash

    bayesq fit      --config configs/digits_cnn.yaml                 # train; BayesQ at the end
    bayesq quantize --config configs/digits_cnn.yaml --bayesq.config.bits 3.0  # the last fit's
    bayesq distill  --config configs/digits_cnn.yaml --distillation.epochs 5   # checkpoint

The BayesQ options are the ``bayesq`` group (:class:`~bayesq_lightning.BayesQCallback`, with its
``config`` a :class:`~bayesq_lightning.BayesQConfig`), attached to the Trainer of every
subcommand. ``quantize`` and ``distill`` are methods of :class:`BayesQTrainer`, so their options
come from those methods' signatures (LightningCLI's custom-subcommand pattern). A ``ckpt_path``
makes LightningCLI read only the checkpoint's hyperparameters; both methods load the weights
themselves (without one, the newest checkpoint under ``trainer.default_root_dir``). They run no
Trainer stage that would save the config, so they write ``config.yaml`` next to their outputs.

Every output goes to the run's version directory: ``fit`` exports to ``bayesq/``, ``quantize``
and ``distill`` to ``quantize-<bits>b/`` / ``distill-<bits>b/`` beside the checkpoint's
``checkpoints/``; an existing artifact is replaced only with ``--overwrite``. Each subcommand
ends with :func:`~bayesq_lightning.report.summary`. The parser (:mod:`.cli_parser`) gives
plain-text help and one-line errors; :func:`main` reports expected errors in one line and runs
the command inside :func:`~bayesq_lightning.lightning.quiet.quiet`.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from ..allocate import InfeasibleBudgetError
from ..artifact.export import OUTPUTS, check_export_dir
from ..distillation.config import DistillConfig
from ..progress import on_terminal
from ..report import plot_allocation, summary
from .callback import BayesQCallback, calibration_data
from .cli_parser import BayesQParser, parser_kwargs
from .distill import distill_callback_result
from .quiet import log_interval, quiet

DISTILL_DEFAULTS = DistillConfig()  # never modified
USER_ERRORS = (ValueError, TypeError, OSError)
"""Errors the command reports in one line (bad input, missing or existing files)."""
BUDGET_OPTIONS = {"`bits`": "--bayesq.config.bits",
                  "budget_bytes": "--bayesq.config.budget_bytes",
                  "allow fewer bits": "allow narrower widths in --bayesq.config.allowed_bits"}
"""An infeasible budget's message: the configuration's words, and what the command takes."""
__all__ = ["OUTPUTS", "BayesQCLI", "BayesQTrainer", "main"]


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
                 ckpt_path: str | None = None, output_dir: str | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
        """Quantize a trained checkpoint: evaluate, quantize, evaluate, export, report, plot.

        Args:
            model: the configured model; its weights come from ``ckpt_path``.
            datamodule: provides the calibration hold-out and the evaluation split.
            ckpt_path: the trained checkpoint (default: the newest one under
                trainer.default_root_dir, i.e. the last `bayesq fit` of this config).
            output_dir: where the artifact, report.json, allocation.png and config.yaml go
                (default: quantize-<bits>b/ in the checkpoint's version directory).
            overwrite: replace an artifact already in the output directory (else refused).
        """
        return self._quantize(model, datamodule, ckpt_path, output_dir, overwrite, None)

    def distill(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
                ckpt_path: str | None = None, output_dir: str | None = None,
                overwrite: bool = False,
                distillation: DistillConfig = DISTILL_DEFAULTS) -> dict[str, Any]:
        """Quantize a trained checkpoint, then distil it toward the posterior predictive.

        Distillation uses only the calibration inputs; the report holds the evaluation split's
        accuracy / NLL / ECE of the FP32, quantized and distilled models and of the teacher.

        Args:
            model: the configured model; its weights come from ``ckpt_path``.
            datamodule: provides the calibration hold-out and the evaluation split.
            ckpt_path: as for quantize (default: the newest checkpoint of the last fit).
            output_dir: as for quantize, default distill-<bits>b/ in the checkpoint's version
                directory; the artifact holds the distilled model.
            overwrite: replace an artifact already in the output directory (else refused).
            distillation: the distillation options (:class:`~bayesq_lightning.DistillConfig`).
        """
        return self._quantize(model, datamodule, ckpt_path, output_dir, overwrite, distillation)

    def _quantize(self, model, datamodule, ckpt_path, output_dir, overwrite, distill_config
                  ) -> dict[str, Any]:
        cb = self._bayesq_callback()
        if self.num_devices * self.num_nodes > 1:
            raise ValueError("bayesq quantize / distill run in one process (devices=1); "
                             "multi-device quantization happens at the end of `bayesq fit`")
        if datamodule is None:
            raise ValueError("a datamodule is required (calibration and evaluation data); set "
                             "`data:` in the config")
        root = Path(self.default_root_dir)
        if ckpt_path is not None and not Path(ckpt_path).is_file():
            latest_checkpoint(root, given=str(ckpt_path))  # raises, naming where fit saved
        ckpt = Path(ckpt_path) if ckpt_path is not None else latest_checkpoint(root)
        kind = "quantize" if distill_config is None else "distill"
        out = Path(output_dir) if output_dir else default_output_dir(ckpt, kind, cb.config.bits)
        cb.overwrite = overwrite or cb.overwrite
        check_export_dir(out, cb.overwrite, "--overwrite")  # before any work
        load_checkpoint_weights(model, ckpt)
        model.eval()
        t0 = time.perf_counter()
        datamodule.setup("fit")
        train = datamodule.train_dataloader()
        calib, n_data = calibration_data(cb.config, datamodule, train)
        val = datamodule.val_dataloader() if cb.evaluate else None
        cb.export_dir = out
        result = cb.quantize_module(model, calib, n_data, val)
        report = {"checkpoint": str(ckpt), **cb.report,
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
        write_report(out, report, result, cb.baselines, type(model).__name__)
        self.bayesq_output_dir = out
        rank_zero_info("BayesQ allocation\n" + result.table())
        print(summary(report, {"checkpoint": ckpt, "artifact": out,
                               "report": out / "report.json"}), flush=True)
        return report


CHECKPOINTS = ("*/version_*/checkpoints/*.ckpt", "checkpoints/*.ckpt")
"""Where ``bayesq fit`` saves under ``trainer.default_root_dir`` (with a logger; without one)."""


def latest_checkpoint(root: Path, given: str | None = None) -> Path:
    """The newest checkpoint ``bayesq fit`` saved under ``root`` (:data:`CHECKPOINTS`), or say
    where we looked; ``given``: the ``--ckpt_path`` that does not exist, named in the error."""
    found = [p for pattern in CHECKPOINTS for p in root.glob(pattern) if p.is_file()]
    searched = " and ".join(repr(str(root / p)) for p in CHECKPOINTS)
    if given is not None:
        hint = (f"the newest checkpoint of a fit here is {str(max(found, key=_mtime))!r}"
                if found else f"no checkpoint found in {searched}")
        raise FileNotFoundError(f"checkpoint {given!r} does not exist ({hint}); pass the .ckpt "
                                "file written by `bayesq fit`, or leave --ckpt_path out to take "
                                "the newest")
    if not found:
        raise FileNotFoundError(
            f"no --ckpt_path given and no checkpoint in {searched}; pass --ckpt_path, or run "
            "`bayesq fit` with this config (and its trainer.default_root_dir) first")
    return max(found, key=_mtime)


def _mtime(path: Path) -> tuple[float, str]:
    return path.stat().st_mtime, str(path)


def default_output_dir(ckpt: Path, kind: str, bits: float) -> Path:
    """``<the checkpoint's version directory>/<kind>-<bits>b``: beside ``checkpoints/``."""
    version = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return version / f"{kind}-{bits:g}b"


def write_report(out: Path, report: dict[str, Any], result, baselines: dict,
                 model_name: str) -> None:
    """``report.json`` and ``allocation.png`` (BayesQ beside the baselines) in ``out``."""
    report["allocation"] = result.table()
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    plot_allocation({"bayesq": result, **baselines}, out / "allocation.png",
                    title=f"{model_name}: {result.bits_per_weight:.3f} bits/weight")


class _FitLogInterval(Callback):
    """Lowers ``log_every_n_steps`` to the training epoch's length (Lightning warns, and logs
    no training step, when an epoch is shorter than the interval)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.datamodule is None:
            return
        try:
            n = len(trainer.datamodule.train_dataloader())
        except TypeError:  # an iterable loader has no length
            return
        limit = trainer.limit_train_batches
        n = min(n, limit) if isinstance(limit, int) else int(n * limit)
        trainer.log_every_n_steps = log_interval(n, trainer.log_every_n_steps)


class BayesQCLI(LightningCLI):
    """``LightningCLI`` with the ``quantize`` and ``distill`` subcommands and the ``bayesq``
    callback group; plain-text help with the key options first, one-line errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_class", BayesQTrainer)
        kwargs.setdefault("parser_class", BayesQParser)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", parser_kwargs())
        kwargs.setdefault("trainer_defaults", {"enable_progress_bar": on_terminal()})
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "quantize": {"model", "datamodule"},
                "distill": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(BayesQCallback, "bayesq")

    def before_fit(self) -> None:
        cb = self.trainer._bayesq_callback()
        if cb.export_dir is None:  # inside this run's version directory: never overwritten
            cb.export_dir = Path(self.trainer.log_dir) / "bayesq"
        self.trainer.callbacks.append(_FitLogInterval())

    def after_fit(self) -> None:
        cb = self.trainer._bayesq_callback()
        if cb.result is None or not self.trainer.is_global_zero:
            return
        ckpt = self.trainer.checkpoint_callback
        ckpt = (ckpt.last_model_path or ckpt.best_model_path) if ckpt is not None else None
        paths = {"checkpoint": ckpt or None, "artifact": cb.export_dir, "report": None}
        if cb.export_dir is not None:
            report = {"checkpoint": ckpt, **cb.report}
            write_report(cb.export_dir, report, cb.result, cb.baselines,
                         type(self.model).__name__)
            paths["report"] = cb.export_dir / "report.json"
        print(summary(cb.report, paths), flush=True)

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
    """Entry point of the ``bayesq`` console script.

    An expected error (bad input, a missing file, an infeasible budget) prints one line and
    exits with status 1; ``--traceback`` (anywhere on the command line) shows the traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    trace = "--traceback" in args
    args = [a for a in args if a != "--traceback"]
    for i, a in enumerate(args):  # a bare --overwrite means --overwrite true
        if a == "--overwrite" and (i + 1 == len(args) or args[i + 1].startswith("-")):
            args[i] = "--overwrite=true"
    if argv is None:  # the console script: LightningCLI reads sys.argv itself
        sys.argv[1:] = args
    try:
        with quiet():
            BayesQCLI(pl.LightningModule, pl.LightningDataModule,
                      **({} if argv is None else {"args": args}))
    except USER_ERRORS as exc:
        if trace:
            raise
        print(f"bayesq: error: {one_line(exc)} (--traceback shows where)", file=sys.stderr,
              flush=True)
        raise SystemExit(1) from None


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line; of a jsonargparse type error (a list of every type
    tried), the reason the value was refused; of an infeasible budget, with the options named
    as the command takes them (:data:`BUDGET_OPTIONS`)."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    reasons = [line.strip()[2:] for line in lines[1:] if line.strip().startswith("- ")
               and not line.strip().startswith("- Expected a <class")]
    text = reasons[0] if reasons else " ".join(line.strip() for line in lines)
    if isinstance(exc, InfeasibleBudgetError):  # name the options as they are typed
        pattern = "|".join(map(re.escape, BUDGET_OPTIONS))
        text = re.sub(pattern, lambda m: BUDGET_OPTIONS[m.group(0)], text)
    return text
