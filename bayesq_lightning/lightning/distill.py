r"""
Calibration-only distillation as a LightningModule, and the two ways to run it
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

.. code-block:: python

    cb = BayesQCallback(bits=2.5)
    trainer = L.Trainer(callbacks=[cb])
    trainer.fit(module, datamodule)              # quantizes at the end of fit
    distill(trainer, cb, DistillConfig())        # a second Trainer.fit on the calibration data
    cb.report["distilled"]                       # accuracy / nll / ece, same data as "quantized"

or, without a Trainer, ``distill_model(fp32_model, result, calibration_loader, DistillConfig())``.
Lightning does not support ``fit`` inside a callback hook, so distillation is its own
``Trainer.fit`` after the first returns; a fresh Trainer with the same accelerator, devices and
strategy reuses the launched processes and their process group.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn
from typing_extensions import override

from ..artifact.export import write_artifact
from ..artifact.temperature import logit_temperature, logits_form, set_logit_temperature
from ..batches import LogitsModel, batch_size_of, calibration_samples, inputs_to, split_batch
from ..distillation.config import DistillConfig
from ..distillation.selection import MIN_HOLDOUT, EpochChoice, choose_epoch
from ..distillation.student import (
    LABELS_KEY,
    TEACHER_KEY,
    DistillSet,
    check_student,
    distill_loss,
    finish_student,
    start_student,
    student_inputs,
)
from ..distillation.teachers import Teacher, build_teacher, fp32_reference, tune_teacher
from ..metrics import _metric_objects, _update, evaluate
from ..progress import on_terminal
from ..result import QuantizationResult
from .distill_fits import StudentFits, distance_lr, folds_of, trainer_factory
from .quiet import quiet


class PosteriorDistillModule(pl.LightningModule):
    """Distil a packed quantized ``student`` toward ``teacher`` on inputs alone.

    Args:
        student: the quantized model (its packed layers are tuned in place: integer codes frozen,
            quantizer parameters as fp32 masters rounded to fp16 in every forward).
        teacher: a :class:`~bayesq_lightning.distillation.Teacher` (log-probabilities, frozen).
        config: :class:`~bayesq_lightning.DistillConfig` (``train``, ``lr``, ``temperature``).
        n_classes: number of classes of the validation metrics (default: the teacher's).
        holdout: batches of calibration inputs (or :class:`DistillSet` batches) kept out of
            training; the student ends at the epoch :func:`~bayesq_lightning.distillation.
            choose_epoch` keeps from the per-input KLs to the teacher on them (0: undistilled).

    Training batches are the calibration inputs (labels, if present, are dropped) or
    :class:`~bayesq_lightning.distillation.student.DistillSet` batches carrying precomputed teacher
    log-probabilities. Validation batches are labelled; the student's micro accuracy, NLL and
    15-bin ECE are logged per epoch as ``student/{accuracy,nll,ece}`` (torchmetrics objects,
    synced across processes on compute). Call :meth:`finish` after ``fit``.
    """

    def __init__(self, student: nn.Module, teacher: Teacher, config: DistillConfig | None = None,
                 n_classes: int | None = None, holdout: Iterable | None = None) -> None:
        super().__init__()
        self.config = config or DistillConfig()
        n_classes = n_classes or getattr(teacher, "n_classes", None)
        if not n_classes:
            raise ValueError("n_classes is unknown: pass n_classes= or a teacher built by "
                             "build_teacher and probed on a batch")
        self.student = student
        self.teacher = teacher
        self.metrics = nn.ModuleDict(_metric_objects(n_classes, "cpu"))
        self._state = start_student(student, self.config.train)
        self._initial = [p.detach().clone() for p in self._state.params]
        self._net = LogitsModel(student)
        self._epoch_start = 0.0
        self.epoch_seconds: list[float] = []
        self.lr = self.config.lr  # or set from the student's distance (StudentFits.step_size)
        self.kept_epoch: int | None = None
        self.holdout = holdout
        self.holdout_kl: list[float] = []  # per epoch, epoch 0 = before training
        self._holdout_kls: list[torch.Tensor] = []  # the same, per hold-out input
        self._holdout_nlls: list[torch.Tensor] = []  # their label NLLs, where labelled
        self._holdout_logits: list[torch.Tensor] = []  # the student's logits on them
        self._holdout_targets: torch.Tensor | None = None  # the teacher's log-probabilities
        self.choice = EpochChoice(0, 0, 0.0, 0.0)
        self._lowest: list[torch.Tensor] | None = None  # parameters at the lowest mean so far

    def reset_holdout(self, holdout: Iterable | None) -> None:
        """Track a new hold-out from the next ``fit`` on (cross-fitting's next fold)."""
        self.holdout = holdout
        self.holdout_kl, self._holdout_kls, self._holdout_nlls = [], [], []
        self._holdout_logits, self._holdout_targets = [], None
        self._lowest = None

    @property
    def seconds_per_epoch(self) -> float | None:
        """Median wall time of a training epoch (validation excluded)."""
        if not self.epoch_seconds:
            return None
        return float(sorted(self.epoch_seconds)[len(self.epoch_seconds) // 2])

    @override
    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()

    @override
    def on_train_epoch_end(self) -> None:
        self.epoch_seconds.append(time.perf_counter() - self._epoch_start)
        kl = self._track_holdout()
        if kl is not None:
            self.log("distill/holdout_kl", kl, on_step=False, on_epoch=True)

    @override
    def on_train_start(self) -> None:
        self._track_holdout()

    @property
    def best_epoch(self) -> int:
        """The epoch the student ends at (0: undistilled; the last trained without a hold-out);
        set by the distillation's fits (:class:`~.distill_fits.StudentFits`), else this fit's."""
        if self.kept_epoch is not None:
            return self.kept_epoch
        return self.choice.epoch if self.holdout else self.current_epoch

    @property
    def holdout_record(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Per epoch (0: before training), the hold-out's per-input KLs and label NLLs."""
        return self._holdout_kls, (self._holdout_nlls or None)

    @override
    def on_train_end(self) -> None:
        if not self._holdout_kls:
            return
        kls, nlls = self.holdout_record
        self.choice = choose_epoch(kls, self.config.min_gain_se, nlls)
        keep = self._lowest if self.choice.epoch else self._initial
        with torch.no_grad():  # the kept epoch's parameters (epoch 0: as before training)
            for p, v in zip(self._state.params, keep, strict=True):
                p.copy_(v)

    @property
    def holdout_outputs(self) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Per epoch, the student's logits on the hold-out; and the teacher's log-probabilities."""
        return self._holdout_logits, self._holdout_targets

    @torch.no_grad()
    def divergences(self, batches: Iterable) -> tuple[torch.Tensor, ...]:
        """Per input of ``batches``: ``T^2 KL(teacher || student)``, the label NLL where the
        batches carry labels (:data:`~bayesq_lightning.distillation.student.LABELS_KEY`, else
        ``None``), the student's logits and the teacher's log-probabilities."""
        kls, nlls, outs, targets = [], [], [], []
        for batch in batches:
            kl, logits, target = self._loss(batch, per_example=True, with_outputs=True)
            kls.append(kl.cpu())
            outs.append(logits.float().cpu())
            targets.append(target.float().cpu())
            y = batch.get(LABELS_KEY) if isinstance(batch, dict) else None
            if y is not None and bool(((y >= 0) & (y < logits.shape[-1])).all()):  # not -100
                y = y.to(logits.device)
                nlls.append(-logits.float().log_softmax(-1).gather(-1, y[:, None])[:, 0].cpu())
        labelled = len(nlls) == len(kls) and bool(nlls)
        return (torch.cat(kls), (torch.cat(nlls) if labelled else None), torch.cat(outs),
                torch.cat(targets))

    def holdout_divergences(self) -> torch.Tensor:
        """``T^2 KL(teacher || student)`` of each held-out calibration input."""
        return self.divergences(self.holdout)[0]

    def _loss(self, batch, per_example: bool = False, with_outputs: bool = False):
        """The distillation loss of a batch; teacher outputs precomputed in it or run now."""
        x = inputs_to(student_inputs(batch), self.device)  # a no-op on Lightning's batches
        target = (batch[TEACHER_KEY].to(self.device)
                  if isinstance(batch, dict) and TEACHER_KEY in batch else self.teacher(x))
        logits = self(x)
        loss = distill_loss(logits, target, self.config.temperature, per_example)
        return (loss, logits, target) if with_outputs else loss

    def _track_holdout(self) -> float | None:
        # every process sees the whole hold-out and identical students: identical choices
        if not self.holdout:
            return None
        values = self.divergences(self.holdout)
        if self._trainer is not None:  # rank 0's values decide, so every process agrees
            values = self.trainer.strategy.broadcast(values, src=0)
        kls, nlls, logits, targets = values
        kl = float(kls.double().mean())
        if not self.holdout_kl or kl < min(self.holdout_kl):  # the earliest lowest
            self._lowest = [p.detach().clone() for p in self._state.params]
        self.holdout_kl.append(kl)
        self._holdout_kls.append(kls)
        if nlls is not None:
            self._holdout_nlls.append(nlls)
        self._holdout_logits.append(logits)
        self._holdout_targets = targets
        return kl

    @override
    def train(self, mode: bool = True) -> PosteriorDistillModule:
        super().train(mode)
        self.student.eval()  # BatchNorm statistics frozen, no dropout: ranks stay identical
        self.teacher.eval()
        return self

    def forward(self, x) -> torch.Tensor:
        return self._net(x)

    @override
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("distill/kl", loss, prog_bar=True, on_step=False, on_epoch=True,
                 batch_size=batch_size_of(student_inputs(batch)))
        return loss

    @override
    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = split_batch(batch)
        if y is None:
            raise ValueError("validation batches need labels: (inputs, targets) or dicts with "
                             "a 'labels' key")
        _update(self.metrics, self(student_inputs(batch)).float(), y)
        self.log_dict({f"student/{k}": m for k, m in self.metrics.items()}, on_step=False,
                      on_epoch=True)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.lr is None:  # lr=None: from the student's distance to the teacher
            if not self.holdout:
                raise ValueError("DistillConfig(lr=None) sets the step size from the student's "
                                 "KL to the teacher: pass holdout= batches, or a fixed lr")
            self.lr = distance_lr(self.config, float(self.holdout_divergences().double().mean()))
        return torch.optim.Adam(self._state.params, lr=self.lr)

    def restore_initial(self) -> None:
        """Put every trained parameter back to its value before distillation (on failure)."""
        with torch.no_grad():
            for p, v in zip(self._state.params, self._initial, strict=True):
                p.copy_(v)

    def finish(self, result: QuantizationResult | None = None) -> nn.Module:
        """Store the fp16-rounded parameters in the packed buffers; returns the student."""
        finish_student(self.student, self._state, result)
        return self.student


def _probe(teacher: Teacher, student: nn.Module, batch) -> int:
    """Run teacher and student on one batch before any training: clear errors, the class count."""
    x = student_inputs(batch)
    try:
        t = teacher(x)
        with torch.no_grad():
            device = next(student.parameters()).device
            s = LogitsModel(student)(inputs_to(x, device))
    except ValueError:
        raise
    except Exception as exc:  # any failure here means the batches are not the model's input
        raise ValueError(
            f"the calibration batches do not fit the model ({type(exc).__name__}: {exc}); pass "
            "batches of the model's input form: (inputs, targets) tuples, bare inputs or dict "
            "batches"
        ) from exc
    if logits_form(s) != "tensor" or s.dim() != 2:
        raise ValueError(
            f"the student returns {type(s).__name__}"
            f"{' of shape ' + str(tuple(s.shape)) if isinstance(s, torch.Tensor) else ''}, not "
            "logits: distillation and its temperature need forward to return (batch, classes) "
            "logits, or an object whose .logits they are (transformers)")
    s = s.float()
    if bool(((s >= 0) & (s <= 1)).all()) and torch.allclose(s.sum(-1), torch.ones_like(s[:, 0]),
                                                            atol=1e-4):
        raise ValueError("the student returns probabilities (each row is in [0, 1] and sums to 1),"
                         " not logits: distillation and its temperature need the logits; return "
                         "them from forward (drop the final softmax)")
    if t.shape[-1] != s.shape[-1]:
        raise ValueError(f"the student outputs {s.shape[-1]} classes and the teacher "
                         f"{t.shape[-1]}; distil a student toward a teacher of the same model")
    teacher.n_classes = int(t.shape[-1])
    return teacher.n_classes


def _run(student: nn.Module, fp32_model: nn.Module, posterior, batches: list,
         eval_loader: Iterable | None, config: DistillConfig, result: QuantizationResult | None,
         trainer_kwargs: dict[str, Any], eval_batches: int | None = None) -> dict[str, Any]:
    """Shared by :func:`distill` and :func:`distill_model`: checks, teacher, fits, report.

    Every check runs before the student is touched; if training fails, the trained parameters
    (and the student's logit temperature) are put back before the error propagates.
    """
    kwargs = {"max_epochs": config.epochs, "logger": False, "enable_checkpointing": False,
              "enable_model_summary": False, "num_sanity_val_steps": 0,
              "limit_val_batches": (0 if eval_loader is None else eval_batches),
              "enable_progress_bar": on_terminal(), **trainer_kwargs}
    new_trainer = trainer_factory(kwargs)
    trainer = new_trainer()  # bad Trainer arguments fail here, before any change
    if eval_loader is not None:
        first = next(iter(eval_loader), None)
        if first is None or split_batch(first)[1] is None:
            raise ValueError("the evaluation loader must yield labelled batches ((inputs, "
                             "targets) or dicts with 'labels'); it is for metrics only")
    check_student(student, config.train)
    teacher = build_teacher(config, fp32_model, posterior)
    set_logit_temperature(teacher.net, None)  # a copy of a tempered student: the raw logits
    n_classes = _probe(teacher, student, batches[0])  # before any long work
    tune_teacher(teacher, config, batches)
    data = DistillSet(batches, teacher if config.precompute_teacher else None)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed))
    folds = folds_of(order, config)
    n_hold = sum(len(f) for f in folds)
    too_small = bool(config.holdout) and n_hold < MIN_HOLDOUT
    if too_small:
        _warn_small(n_hold, len(data), config)
    module = PosteriorDistillModule(student, teacher, config, n_classes)
    module.to(next(student.parameters()).device)  # the passes before a fit: the student's
    fits = StudentFits(module, data, config,
                       config.batch_size or batch_size_of(student_inputs(batches[0])),
                       new_trainer, kwargs["logger"], "log_every_n_steps" in trainer_kwargs,
                       eval_loader)
    kl0 = None
    previous = logit_temperature(student)  # a new distillation starts from the raw logits
    try:
        set_logit_temperature(student, None)
        if not too_small:
            kl0 = fits.step_size(lambda v: trainer.strategy.broadcast(v, src=0))
            module.kept_epoch, held_out = fits.train(order, folds)
            if config.fit_temperature:
                t = fits.temperature(held_out)
                set_logit_temperature(student, float(trainer.strategy.broadcast(t, src=0)))
        if eval_loader is not None:  # the final student, on every process's shard, synced
            with quiet():
                trainer.validate(module, eval_loader, verbose=False)
    except BaseException:
        module.restore_initial()  # the model as it was, then the error
        set_logit_temperature(student, previous)
        raise
    finally:
        module.finish(result)
    _log_choice(module, config, n_hold)
    report = _report(module, teacher, config, data, folds, kl0)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("student/")}
    if logged:
        report["logged"] = logged
    if eval_loader is not None:
        device = trainer.strategy.root_device  # teardown left the modules on the CPU
        for key, m in (("distilled", student), ("teacher_metrics", teacher),
                       ("fp32", teacher.net)):
            report[key] = evaluate(m.to(device), eval_loader, eval_batches)
            m.cpu()
        _log_once(trainer, report)
        rank_zero_info(f"BayesQ distillation ({teacher.name} teacher): " + ", ".join(
            f"{k}={v:.4f}" for k, v in report["distilled"].items()))
    return report


def _warn_small(n_hold: int, n: int, config: DistillConfig) -> None:
    need = math.ceil(MIN_HOLDOUT / (1.0 if config.cross_fit else config.holdout))
    rank_zero_warn(f"the distillation hold-out has {n_hold} calibration inputs "
                   f"(holdout={config.holdout:g} of {n}"
                   f"{', cross-fitted' if config.cross_fit else ''}), fewer than the "
                   f"{MIN_HOLDOUT} needed to choose an epoch: the student is kept "
                   f"undistilled; give at least {need} calibration inputs or raise holdout")


def _log_choice(module: PosteriorDistillModule, config: DistillConfig, n_hold: int) -> None:
    if len(module.holdout_kl) <= 1:
        return
    c = module.choice
    veto = ("" if c.nll_gain is None else
            f", as must its hold-out NLL gain, {c.nll_gain:.4g} ± {c.nll_gain_se:.2g}")
    rank_zero_info(f"BayesQ distillation keeps epoch {c.epoch} of {config.epochs}: the "
                   f"lowest hold-out KL, epoch {c.lowest}, gains {c.gain:.4g} ± {c.gain_se:.2g}"
                   f" (paired SE, {n_hold} inputs) on epoch 0, kept if above "
                   f"{config.min_gain_se:g} SE{veto}")


def _report(module: PosteriorDistillModule, teacher: Teacher, config: DistillConfig,
            data: DistillSet, folds: list[list[int]], kl0: float | None) -> dict[str, Any]:
    c = module.choice
    return {"config": config.to_dict(), "teacher": teacher.name,
            "teacher_temperature": getattr(teacher, "temperature", None),
            "n_calibration": len(data), "n_holdout": sum(len(f) for f in folds),
            "cross_fit": bool(folds) and config.cross_fit, "lr": module.lr, "kl0": kl0,
            "best_epoch": module.best_epoch, "holdout_kl": module.holdout_kl,
            "holdout_gain": c.gain, "holdout_gain_se": c.gain_se,
            "holdout_nll_gain": c.nll_gain, "holdout_nll_gain_se": c.nll_gain_se,
            "lowest_epoch": c.lowest, "student_temperature": logit_temperature(module.student),
            "seconds_per_epoch": module.seconds_per_epoch}


@contextmanager
def _eval_mode(student: nn.Module) -> Iterator[None]:
    """The student in eval mode for every pass of distillation (the probe, the step size's and
    the temperature's passes, not only the fits): BatchNorm statistics never move. A module
    fresh from ``Trainer.fit`` is in training mode; each module's mode is put back after."""
    modes = [(m, m.training) for m in student.modules()]
    student.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.train(training)


def _same_hardware(trainer: pl.Trainer) -> dict[str, Any]:
    """Trainer arguments reproducing ``trainer``'s accelerator, devices, nodes and strategy.

    Single-device strategies and DDP (Lightning's default ``popen`` launcher, whose processes
    and process group a new Trainer reuses) are supported; others are refused.
    """
    strategy = trainer.strategy
    out: dict[str, Any] = {"accelerator": trainer.accelerator, "num_nodes": trainer.num_nodes}
    if isinstance(strategy, DDPStrategy):
        if getattr(strategy, "_start_method", "popen") != "popen":
            raise ValueError(f"distill after strategy={strategy.strategy_name!r} is not "
                             "supported: its processes ended with fit; use strategy='ddp'")
        out["strategy"] = DDPStrategy(process_group_backend=strategy.process_group_backend)
    elif isinstance(strategy, SingleDeviceStrategy):
        out["strategy"] = "auto"
    else:
        raise ValueError(f"distill supports single-device and 'ddp' runs, not "
                         f"{type(strategy).__name__}; call distill_model on the quantized "
                         "result instead")
    out["devices"] = (trainer.num_devices if isinstance(trainer.accelerator, CPUAccelerator)
                      else trainer.device_ids)
    return out


@rank_zero_only
def _log_once(trainer: pl.Trainer, report: dict[str, Any]) -> None:
    """The distilled student, the teacher and the FP32 model, once, through the loggers."""
    metrics = {f"bayesq/{name}/{k}": v for name, key in (("distilled", "distilled"),
                                                          ("teacher", "teacher_metrics"),
                                                          ("fp32", "fp32"))
               for k, v in report[key].items()}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def distill_model(model: nn.Module, result: QuantizationResult, calibration_loader: Iterable,
                  config: DistillConfig | None = None, *, eval_loader: Iterable | None = None,
                  posterior=None, max_batches: int | None = None,
                  **trainer_kwargs: Any) -> dict[str, Any]:
    """Distil ``result.model`` in place toward a teacher built from ``model``; no Trainer needed.

    Args:
        model: the FP32 model ``result`` was quantized from (not modified). When it *is*
            ``result.model`` (``quantize_model(..., inplace=True)``), the FP32 weights are taken
            from the posterior's means.
        result: the :class:`~bayesq_lightning.QuantizationResult`; its packed model is the
            student, tuned in place, and its block records are refreshed.
        calibration_loader: calibration batches (labels ignored); never the evaluation data.
        config: :class:`~bayesq_lightning.DistillConfig`.
        eval_loader: labelled evaluation data for per-epoch and final metrics.
        posterior: the posterior of the teacher (default ``result.posterior``); lets a
            posterior-free baseline distil toward BayesQ's posterior.
        max_batches: cap on calibration batches (default: all).
        **trainer_kwargs: passed to ``lightning.pytorch.Trainer`` (``accelerator``, ``devices``,
            ``strategy``, ``logger``, ...).

    Returns:
        The report: ``distilled``, ``teacher_metrics``, ``fp32`` (accuracy / NLL / ECE on
        ``eval_loader``), ``logged`` (the last epoch's logged student metrics), settings.
    """
    config = config or DistillConfig()
    posterior = posterior if posterior is not None else result.posterior
    student = result.model
    fp32 = fp32_reference(model, posterior) if model is student else model
    batches, _ = calibration_samples(calibration_loader, max_batches or 10**12,
                                     "distillation calibration loader")
    with _eval_mode(student):
        return _run(student, fp32, posterior, batches, eval_loader, config, result,
                    trainer_kwargs)


def distill(trainer: pl.Trainer, callback, config: DistillConfig | None = None,
            **trainer_kwargs: Any) -> dict[str, Any]:
    """Distil the module a finished ``trainer.fit`` quantized with ``callback`` (a
    :class:`~bayesq_lightning.BayesQCallback`), on the calibration batches it used.

    A fresh Trainer with the same accelerator, devices, nodes and strategy runs the
    distillation; the distilled weights end in the user's module, and
    ``callback.report["distilled"]`` (and ``["teacher"]``) are filled on the data
    ``callback.report["quantized"]`` was measured on; with the callback's ``export_dir``, the
    artifact there is rewritten with the distilled weights. Returns the distillation report.
    """
    module = trainer.lightning_module
    if module is None:
        raise ValueError("the trainer holds no LightningModule; pass the trainer fit ran on")
    return distill_callback_result(trainer, callback, module, config, **trainer_kwargs)


def distill_callback_result(trainer: pl.Trainer, callback, module: nn.Module,
                            config: DistillConfig | None = None,
                            **trainer_kwargs: Any) -> dict[str, Any]:
    """:func:`distill` for a ``module`` the callback quantized (``bayesq distill`` runs no fit)."""
    config = config or DistillConfig()
    result = callback.result
    if result is None or not getattr(callback, "calibration_batches", None):
        raise ValueError("the callback has not quantized anything yet: run trainer.fit(...) "
                         "with the BayesQCallback attached before distill(trainer, callback)")
    if "distill" in callback.report:
        raise ValueError("this callback's model is already distilled; its biases and norms are "
                         "no longer the FP32 ones a teacher needs: quantize again to distil anew")
    kwargs = {**_same_hardware(trainer), "logger": trainer.loggers or False,
              "enable_progress_bar": trainer.progress_bar_callback is not None, **trainer_kwargs}
    val = callback.eval_loader
    fp32 = fp32_reference(module, result.posterior)
    with torch.inference_mode(False), torch.enable_grad(), _eval_mode(module):
        report = _run(module, fp32, result.posterior, callback.calibration_batches, val, config,
                      result, kwargs, callback.eval_batches)
    if "distilled" in report:
        callback.report["distilled"] = report["distilled"]
        callback.report["teacher"] = report["teacher_metrics"]
    callback.report["distill"] = {k: v for k, v in report.items()
                                  if k not in ("distilled", "teacher_metrics", "fp32")}
    if callback.export_dir is not None and trainer.is_global_zero:
        write_artifact(module, result, callback.export_dir)  # replaces the callback's own
    return report

