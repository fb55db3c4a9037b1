r"""
BayesQCallback
^^^^^^^^^^^^^^

Quantize a model to a mixed-precision budget at the end of ``Trainer.fit``:

.. code-block:: python

    cb = BayesQCallback(bits=3.0)
    trainer = L.Trainer(callbacks=[cb])
    trainer.fit(module, datamodule)
    cb.result        # QuantizationResult; `module` now holds the quantized weights
    cb.report        # {"fp32": m, "quantized": m, "baselines": {...}}, m = accuracy/nll/ece

The work happens in ``on_train_end`` (model still on its device, process group still up). Metrics
are computed with a manual loop (``self.log`` is not allowed in that hook) and written through
``trainer.loggers`` on rank zero.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.utils.data import DataLoader, Subset
from typing_extensions import override

from ..allocate import InfeasibleBudgetError
from ..artifact import save_quantized
from ..artifact.export import check_export_dir
from ..artifact.manifest import jsonable
from ..artifact.replace import install_packed, packed_replacements, swap_in
from ..batches import (
    LogitsModel,
    calibration_samples,
    clone_module,
    forward_checked,
    inputs_to,
    split_batch,
)
from ..choices import METHODS, SUPPORTED_BITS
from ..config import BayesQConfig
from ..methods import METHODS_TABLE
from ..metrics import evaluate
from ..quantize import quantize_model
from ..result import QuantizationResult
from ..state import posterior_from_state, posterior_state, result_from_state, result_state

DEFAULTS = BayesQConfig()  # never modified: the callback keeps a replaced copy


class BayesQCallback(Callback):
    """Run :func:`~bayesq_lightning.quantize_model` on the trained module at the end of fit.

    Args:
        config: the :class:`~bayesq_lightning.BayesQConfig` (default: its defaults, 3.0 bits);
            a number is taken as ``bits``.
        compare: baseline methods (e.g. ``("rtn",)``) quantized at the same budget from the same
            FP32 weights and evaluated beside BayesQ; reported under ``report["baselines"]``.
        evaluate: evaluate accuracy / NLL / ECE on the validation data before and after.
        eval_batches: cap on validation batches per evaluation (``None``: all).
        export_dir: where rank zero writes the packed artifact (``model.safetensors`` +
            ``bayesq.json``, see :func:`~bayesq_lightning.save_quantized`); ``None``: no export.
        overwrite: replace an artifact already in ``export_dir``; otherwise fitting is refused
            before the first training step.
        progress: progress bars during table construction (drawn on a terminal only).
        **fields: :class:`~bayesq_lightning.BayesQConfig` fields overriding ``config``
            (``BayesQCallback(bits=2.5, structure="diag")``).

    Everything the end of training needs is checked when fitting starts, before the first
    training step: labelled validation batches (unless ``evaluate=False``), calibration batches
    the model reads, and an export directory it may write.

    Raises:
        ValueError: on an invalid configuration, at construction time.
    """

    def __init__(
        self,
        config: BayesQConfig = DEFAULTS,
        *,
        compare: Sequence[str] = (),
        evaluate: bool = True,
        eval_batches: int | None = None,
        export_dir: str | None = None,
        overwrite: bool = False,
        progress: bool = True,
        **fields: Any,
    ) -> None:
        if isinstance(config, (int, float)) and not isinstance(config, bool):
            fields, config = {"bits": config, **fields}, DEFAULTS  # BayesQCallback(2.5)
        if not isinstance(config, BayesQConfig):
            raise TypeError(f"config must be a BayesQConfig, got {type(config).__name__}; pass "
                            "single options as keywords, e.g. BayesQCallback(bits=3.0)")
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(BayesQConfig)})
        if unknown:
            raise TypeError(f"unknown BayesQConfig field(s) {unknown}; see BayesQConfig for the "
                            "options")
        self.config = dataclasses.replace(config, **fields)  # always a new, validated copy
        for m in compare:
            if m not in METHODS or m == self.config.method:
                raise ValueError(f"compare={tuple(compare)!r}: each entry must be a method of "
                                 f"{METHODS} other than method={self.config.method!r}")
            self._baseline_config(self.config, m)  # validates the combination now
        self.compare = tuple(compare)
        self.evaluate = evaluate
        self.eval_batches = eval_batches
        self.progress = progress
        self.export_dir = None if export_dir is None else Path(export_dir)
        self.overwrite = overwrite
        if self.export_dir is not None and self.export_dir.exists() and not self.export_dir.is_dir():
            raise ValueError(f"export_dir={str(export_dir)!r} exists and is not a directory")
        self.result: QuantizationResult | None = None
        self.calibration_batches: list = []
        self.eval_loader = None
        self._global_calibration: list = []
        self.baselines: dict[str, QuantizationResult] = {}
        self.report: dict[str, Any] = {}

    # ------------------------------------------------------------------ data
    def _calibration_batches(self, trainer: pl.Trainer) -> tuple[list, int | None]:
        """This rank's share of the ``calib_batches`` calibration batches, and ``n_data``.

        The source is the datamodule's ``calibration_dataloader()`` when it defines one (the
        bundled datamodules return their calibration hold-out: samples never trained on, whose
        curvature is not the near-zero one of fitted training samples), else a seeded random
        subset of the training set batched like the train loader. Every rank builds
        the same global list and keeps batches ``rank::world_size``: no sample is counted twice
        (a ``DistributedSampler``'s padding never enters) and ``calib_batches`` is a global count.
        """
        batches, n_data = calibration_data(self.config, trainer.datamodule,
                                           trainer.train_dataloader)
        world, rank = trainer.world_size, trainer.global_rank
        if world > 1:  # sharding by index needs the same global list on every rank
            mine = torch.tensor([_fingerprint(batches)], dtype=torch.float64,
                                device=trainer.strategy.root_device)
            every = trainer.strategy.all_gather(mine).reshape(-1)
            if not torch.allclose(every, every[0].expand_as(every), rtol=1e-9, atol=0.0):
                raise ValueError(
                    "the calibration batches differ between ranks, so sharding them would count "
                    "some samples twice and others never; make calibration_dataloader() "
                    "deterministic (shuffle=False or a seeded generator)"
                )
        if len(batches) < world:
            raise ValueError(
                f"{len(batches)} calibration batch(es) for {world} processes: each rank needs "
                f"one; raise calib_batches to at least {world} or give more calibration data"
            )
        self._global_calibration = batches  # every rank's list: distillation reuses it
        return batches[rank::world], n_data

    def _baseline_config(self, cfg: BayesQConfig, method: str) -> BayesQConfig:
        """``cfg`` for a compared method; posterior-free methods score in closed form."""
        if METHODS_TABLE[method].supports_mc_tables:
            return dataclasses.replace(cfg, method=method)
        return dataclasses.replace(cfg, method=method, tables="closed_form", mc_refine_top_k=None)

    @staticmethod
    def _val_loader(trainer: pl.Trainer):
        val = trainer.val_dataloaders
        if isinstance(val, (list, tuple)):
            val = val[0] if val else None
        if val is None and trainer.datamodule is not None:
            try:
                val = trainer.datamodule.val_dataloader()
            except (NotImplementedError, AttributeError):
                val = None
        return val

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.export_dir is not None:
            check_export_dir(self.export_dir, self.overwrite,
                             "BayesQCallback(overwrite=True) (--bayesq.overwrite true)")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """What ``on_train_end`` will read, checked now: a failure costs no training."""
        if self.evaluate:
            val = self._val_loader(trainer)
            first = None if val is None else next(iter(val), None)
            if val is not None and (first is None or split_batch(first)[1] is None):
                raise ValueError(
                    "the validation loader yields " + ("no batches" if first is None else
                                                       "batches without labels") +
                    ", so BayesQ cannot evaluate the model after quantizing it; give it "
                    "(inputs, targets) batches or dicts with 'labels', or pass "
                    "BayesQCallback(evaluate=False) (--bayesq.evaluate false)")
        one = dataclasses.replace(self.config, calib_batches=1)
        batch = calibration_data(one, trainer.datamodule, trainer.train_dataloader)[0][0]
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()  # BatchNorm statistics and dropout untouched by the probe
        try:
            with torch.no_grad():
                x = split_batch(batch)[0]
                forward_checked(LogitsModel(pl_module), inputs_to(x, pl_module.device), 0)
        finally:
            for m, mode in modes.items():
                m.training = mode

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reduce = None
        if trainer.world_size > 1:  # curvature and counts are summed over the ranks' shards
            def reduce(t: torch.Tensor) -> torch.Tensor:
                return trainer.strategy.reduce(t, reduce_op="sum")

        calib, n_data = self._calibration_batches(trainer)
        self._sync_buffers(trainer, pl_module)
        val = self._val_loader(trainer) if self.evaluate else None
        self.quantize_module(pl_module, calib, n_data, val, reduce=reduce,
                             global_zero=trainer.is_global_zero,
                             all_batches=self._global_calibration)
        self._log(trainer, self.result, self.report)

    def quantize_module(self, pl_module: torch.nn.Module, calibration: list, n_data: int | None,
                        eval_loader=None, *, reduce=None, global_zero: bool = True,
                        all_batches: list | None = None) -> QuantizationResult:
        """Quantize ``pl_module`` in place on ``calibration`` batches; evaluate, report, export.

        What ``on_train_end`` runs, callable without a fit (``bayesq quantize`` on a checkpoint):
        baselines from the FP32 weights first, then BayesQ in place; ``self.result`` and
        ``self.report`` are filled and, with ``export_dir``, the artifact is written (on the
        process where ``global_zero``). ``all_batches`` is the calibration list of every
        process together (default ``calibration``), kept for distillation.
        """
        self.baselines = {}
        self.calibration_batches = list(calibration if all_batches is None else all_batches)
        self.eval_loader = eval_loader  # distillation reports on the same data
        cfg = dataclasses.replace(self.config, calib_batches=len(calibration))
        report: dict[str, Any] = {}
        failed: list[Exception] = []  # an evaluation failure must not lose the quantization
        with torch.inference_mode(False), torch.enable_grad(), _budget_hint(cfg):
            if eval_loader is not None:
                self._evaluate_into(report, {"fp32": pl_module}, eval_loader, failed)
            for method in self.compare:  # from the FP32 weights, before they are replaced
                base = quantize_model(pl_module, calibration, self._baseline_config(cfg, method),
                                      n_data=n_data, reduce=reduce, progress=False)
                self.baselines[method] = base
            result = quantize_model(pl_module, calibration, cfg, n_data=n_data, reduce=reduce,
                                    progress=self.progress and global_zero, inplace=True)
            if eval_loader is not None and not failed:
                report["baselines"] = {}
                self._evaluate_into(report, {"quantized": pl_module, **{
                    m: r.model for m, r in self.baselines.items()}}, eval_loader, failed)
        report["info"] = {k: v for k, v in result.info.items() if k != "config"}
        report["bits_per_weight"] = result.bits_per_weight
        report["code_bits_per_weight"] = result.code_bits_per_weight
        report["baseline_bits_per_weight"] = {m: r.bits_per_weight for m, r in self.baselines.items()}
        self.result, self.report = result, report
        if self.export_dir is not None and global_zero:
            save_quantized(pl_module, result, self.export_dir, overwrite=self.overwrite)
        if failed:
            kept = (f"its artifact is saved in {str(self.export_dir)!r}" if self.export_dir
                    is not None else "no export_dir was set, so nothing was written")
            raise EvaluationError(
                f"evaluation failed after quantizing ({type(failed[0]).__name__}: {failed[0]}); "
                f"the quantized model is kept (the module and callback.result) and {kept}; fix "
                "the validation data or pass evaluate=False") from failed[0]
        return result

    def _evaluate_into(self, report: dict[str, Any], models: dict[str, torch.nn.Module],
                       loader, failed: list[Exception]) -> None:
        """``report[name]`` (``report["baselines"][name]`` past the first two) for each model;
        the first failure is appended to ``failed`` instead of raised."""
        try:
            for name, model in models.items():
                metrics = evaluate(model, loader, self.eval_batches)
                if name in ("fp32", "quantized"):
                    report[name] = metrics
                else:
                    report.setdefault("baselines", {})[name] = metrics
        except Exception as exc:  # any failure: raised once the quantized result is safe
            failed.append(exc)

    @staticmethod
    def _sync_buffers(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give every rank rank zero's buffers (e.g. BatchNorm statistics).

        DDP syncs gradients, not buffers: after the last step each rank's BatchNorm running
        statistics differ, and so would the models the ranks quantize.
        """
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            with torch.no_grad():
                for buf in pl_module.buffers():
                    torch.distributed.broadcast(buf, src=0)

    @rank_zero_only
    def _log(self, trainer: pl.Trainer, result: QuantizationResult, report: dict) -> None:
        metrics: dict[str, float] = {
            "bayesq/bits_per_weight": result.bits_per_weight,
            "bayesq/code_bits_per_weight": result.code_bits_per_weight,
        }
        for key in ("fp32", "quantized"):
            for k, v in report.get(key, {}).items():
                metrics[f"bayesq/{key}/{k}"] = v
        for method, m in report.get("baselines", {}).items():
            for k, v in m.items():
                metrics[f"bayesq/{method}/{k}"] = v
        for layer in result.layers:
            metrics[f"bayesq/layers/{layer.name}/bits_per_weight"] = layer.bits_per_weight
            metrics[f"bayesq/layers/{layer.name}/expected_loss"] = layer.expected_loss
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info("BayesQ allocation\n" + result.table())

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the quantized model and to requantize without refitting.

        The config, the allocation with the packed codes and their metadata
        (:func:`~bayesq_lightning.state.result_state`), the posterior's factors and means
        (:func:`~bayesq_lightning.state.posterior_state`) and the report: plain tensors and
        containers, so a checkpoint loads with ``torch.load(..., weights_only=True)``. Empty
        before quantization.
        """
        if self.result is None:
            return {}
        return {
            "config": self.config.to_dict(),
            "result": result_state(self.result),
            "posterior": (None if self.result.posterior is None
                          else posterior_state(self.result.posterior)),
            "report": jsonable(self.report),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``result`` (allocation, codes, posterior; ``result.model`` is ``None``: see
        :func:`restore_quantized`) and ``report``."""
        if not state_dict:
            return
        posterior = state_dict.get("posterior")
        self.result = result_from_state(
            state_dict.get("result", {}),
            None if posterior is None else posterior_from_state(posterior))
        self.report = dict(state_dict.get("report", {}))


@contextmanager
def _budget_hint(cfg: BayesQConfig) -> Iterator[None]:
    """An infeasible budget's message without "allow fewer bits" when the narrowest width is
    allowed already (then only a larger budget helps)."""
    try:
        yield
    except InfeasibleBudgetError as exc:
        if min(cfg.allowed_bits) > min(SUPPORTED_BITS):
            raise
        raise InfeasibleBudgetError(str(exc).replace(" or allow fewer bits", ""),
                                    exc.min_cost) from None


class EvaluationError(ValueError):
    """Evaluation failed after quantization; the quantized model and its artifact are kept."""


def restore_quantized(model: torch.nn.Module, checkpoint: str | Path | Mapping[str, Any]
                      ) -> QuantizationResult:
    """Rebuild a quantized model from a checkpoint written after ``BayesQCallback`` ran.

    ``model`` is a fresh float instance of the trained module (``MyModule(...)``); its
    Linear/Conv2d layers are replaced by the packed layers the checkpoint's callback state
    describes and the checkpoint's ``state_dict`` is loaded strictly, so the result equals the
    quantized model bit for bit. Nothing is refitted. ``result.posterior`` is the saved
    posterior: ``quantize_model(float_model, loader, config, posterior=result.posterior)``
    requantizes (e.g. at another budget) without a new fit, and its layer means are the FP32
    weights (:func:`~bayesq_lightning.state.fp32_weights`).

    Raises
    ------
    ValueError
        The checkpoint has no (or more than one) BayesQCallback state, or it does not fit
        ``model``; ``model`` is then left as it was.
    """
    if isinstance(checkpoint, Mapping):
        ckpt = checkpoint
    else:  # plain tensors and containers only: never unpickles code
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    states = [v for k, v in ckpt.get("callbacks", {}).items()
              if k.startswith("BayesQCallback") and v]
    if len(states) != 1:
        raise ValueError(
            f"the checkpoint holds {len(states)} quantized BayesQCallback states; restore from a "
            "checkpoint saved after BayesQCallback quantized the model (trainer.save_checkpoint "
            "after fit), with one BayesQCallback")
    state = states[0]
    posterior = state.get("posterior")
    result = result_from_state(state.get("result", {}),
                               None if posterior is None else posterior_from_state(posterior))
    trial = clone_module(model)  # never drags a Trainer along
    try:
        new, packed = packed_replacements(trial, result.layers, tied=result.tied,
                                          bits_per_weight=result.bits_per_weight)
        swap_in(trial, new)
        trial.load_state_dict(ckpt["state_dict"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"the checkpoint does not fit this model ({e}); pass a fresh instance "
                         "of the module that was trained and quantized") from e
    install_packed(model, new, packed)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    result.model = model
    return result


def calibration_data(config: BayesQConfig, datamodule, train_loader) -> tuple[list, int | None]:
    """The first ``config.calib_batches`` calibration batches, and ``n_data``.

    From ``datamodule.calibration_dataloader()`` when it exists, else a seeded random subset
    of ``train_loader``'s (map-style) dataset batched like it. ``n_data`` is ``config.n_data``
    or the training set's size.
    """
    train_set = getattr(train_loader, "dataset", None)
    n_data = config.n_data
    if n_data is None and train_set is not None:
        n_data = len(train_set)
    if datamodule is not None and callable(getattr(datamodule, "calibration_dataloader", None)):
        source = datamodule.calibration_dataloader()
    elif train_set is not None:
        size = min(len(train_set), config.calib_batches * (train_loader.batch_size or 1))
        g = torch.Generator().manual_seed(config.seed)
        idx = torch.randperm(len(train_set), generator=g)[:size].tolist()
        source = DataLoader(Subset(train_set, idx), batch_size=train_loader.batch_size or 1,
                            collate_fn=train_loader.collate_fn)
    else:
        raise ValueError("no calibration data: define `calibration_dataloader()` on the "
                         "datamodule or train with a map-style train dataset")
    batches, _ = calibration_samples(source, config.calib_batches)
    return batches, n_data


def _fingerprint(batches: list) -> float:
    """An order-sensitive checksum of the calibration batches' tensors."""
    total = 0.0
    for i, batch in enumerate(batches):
        parts = batch.values() if isinstance(batch, Mapping) else (
            batch if isinstance(batch, (tuple, list)) else [batch])
        for t in parts:
            if torch.is_tensor(t):
                total += (i + 1) * float(t.double().sum())
    return total
