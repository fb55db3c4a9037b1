r"""The fits of one distillation and what they choose: the step size, the epoch, the temperature.

:class:`StudentFits` trains a :class:`~bayesq_lightning.lightning.distill.PosteriorDistillModule`
in one of three ways (``DistillConfig.holdout`` and ``cross_fit``):

* ``holdout=0``: one fit on every calibration input, the last epoch kept;
* one hold-out: one fit on the rest, the student left at the epoch
  :func:`~bayesq_lightning.distillation.choose_epoch` keeps;
* cross-fitting (default): one fit from the undistilled student per fold with that fold held
  out, the choice from every input's held-out values, then one fit on every input for the
  chosen number of epochs. That refit sees ``k / (k - 1)`` times the folds' steps per epoch;
  the choice and the temperature are measured on the fold models.

Each fit is a fresh ``Trainer`` with the caller's arguments (a ``Strategy`` object deep-copied
for each, since a strategy binds to its Trainer); under DDP every process runs every fit, and
rank 0's measurements decide, broadcast.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import Strategy
from torch.utils.data import DataLoader, Subset

from ..distillation.config import DistillConfig
from ..distillation.selection import EpochChoice, choose_epoch
from ..distillation.student import DistillSet
from ..distillation.temperature import fit_temperature
from .quiet import log_interval, quiet

if TYPE_CHECKING:
    from .distill import PosteriorDistillModule

HeldOut = tuple[torch.Tensor, torch.Tensor]  # the kept student's held-out logits, the teacher's


def distance_lr(config: DistillConfig, kl0: float) -> float:
    """``lr_scale * sqrt(KL_0)`` (``config.lr`` if set): see :class:`DistillConfig`."""
    if config.lr is not None:
        return config.lr
    return config.lr_scale * math.sqrt(max(kl0, 0.0))


def folds_of(order: torch.Tensor, config: DistillConfig) -> list[list[int]]:
    """The hold-out index sets: ``max(2, round(1 / holdout))`` interleaved folds of ``order``
    when cross-fitting, else its first ``holdout`` share; none with ``holdout=0``."""
    if not config.holdout:
        return []
    if config.cross_fit:
        k = max(2, round(1 / config.holdout))
        return [sorted(order[j::k].tolist()) for j in range(k) if len(order[j::k])]
    n_hold = int(round(config.holdout * len(order)))
    if n_hold >= len(order):
        raise ValueError(f"holdout={config.holdout} of {len(order)} calibration samples leaves "
                         "none to train on; give more calibration data or a smaller holdout")
    return [sorted(order[:n_hold].tolist())]


def trainer_factory(trainer_args: dict[str, Any]) -> Callable[..., pl.Trainer]:
    """``new_trainer(**overrides)``: a fresh Trainer with ``trainer_args`` each time (a Strategy
    object deep-copied for each, and once now, before any Trainer binds it)."""
    template = trainer_args.get("strategy")
    if isinstance(template, Strategy):
        template = copy.deepcopy(template)

    def new_trainer(**over: Any) -> pl.Trainer:
        args = {**trainer_args, **over}
        if isinstance(template, Strategy):
            args["strategy"] = copy.deepcopy(template)
        with quiet():  # Lightning's tips and warnings a user cannot act on
            return pl.Trainer(**args)

    return new_trainer


@dataclass
class StudentFits:
    """Everything a fit needs; :meth:`train` runs the fits the configuration asks for."""

    module: PosteriorDistillModule
    data: DistillSet
    config: DistillConfig
    batch_size: int
    new_trainer: Callable[..., pl.Trainer]  # trainer_factory's
    logger: Any  # the final fit's (the folds' fits are not logged)
    log_every_given: bool  # the caller set log_every_n_steps
    eval_loader: Iterable | None

    def loader(self, idx: list[int], shuffle: bool = False) -> DataLoader:
        g = torch.Generator().manual_seed(self.config.seed) if shuffle else None
        return DataLoader(Subset(self.data, idx), batch_size=self.batch_size, shuffle=shuffle,
                          generator=g)

    def every(self) -> DataLoader:
        """Every calibration input, in order."""
        return self.loader(list(range(len(self.data))))

    def fit(self, train_idx: list[int], hold_idx: list[int] | None, epochs: int,
            final: bool) -> None:
        """One fit; ``final``: the one that leaves the student, logged and validated."""
        loader = self.loader(train_idx, shuffle=True)
        self.module.reset_holdout(self.loader(hold_idx) if hold_idx else None)
        trainer = self.new_trainer(max_epochs=epochs, logger=self.logger if final else False)
        if not self.log_every_given:  # every epoch logs, however few batches
            trainer.log_every_n_steps = log_interval(len(loader), trainer.log_every_n_steps)
        with quiet():  # among them: the student is in eval mode on purpose
            trainer.fit(self.module, loader, self.eval_loader if final else None)

    def step_size(self, broadcast) -> float | None:
        """Set the module's ``lr`` from the undistilled student's mean KL (``lr=None``);
        returns that KL (rank 0's), or ``None`` with a fixed ``lr``."""
        if self.config.lr is not None:
            return None
        kl0 = float(broadcast(float(self.module.divergences(self.every())[0].double().mean())))
        self.module.lr = distance_lr(self.config, kl0)
        return kl0

    def train(self, order: torch.Tensor, folds: list[list[int]]) -> tuple[int, HeldOut | None]:
        """The fits; returns the epoch the student ends at and its held-out outputs."""
        m, epochs = self.module, self.config.epochs
        if not folds:  # no hold-out: train on all, keep the last epoch
            self.fit(order.tolist(), None, epochs, True)
            return epochs, None
        if not self.config.cross_fit:
            held = set(folds[0])
            self.fit(sorted(i for i in order.tolist() if i not in held), folds[0], epochs, True)
            logits, targets = m.holdout_outputs
            return m.choice.epoch, (logits[m.choice.epoch], targets)
        choice, kls, (logits, targets) = self.cross_fit(order, folds)
        m.restore_initial()
        if choice.epoch:
            self.fit(sorted(order.tolist()), None, choice.epoch, True)
        m.choice, m.holdout_kl = choice, kls
        return choice.epoch, (logits[choice.epoch], targets)

    def cross_fit(self, order: torch.Tensor, folds: list[list[int]]
                  ) -> tuple[EpochChoice, list[float], tuple[list[torch.Tensor], torch.Tensor]]:
        """One fit from the undistilled student per fold, that fold held out. Returns the
        choice from every input's hold-out KL (and NLL) per epoch, the mean KL per epoch, and
        the out-of-fold student logits per epoch with the teacher's log-probabilities."""
        kls, logits, targets = [], [], []
        nlls: list[list[torch.Tensor]] | None = []
        everyone = set(order.tolist())
        for fold in folds:
            self.module.restore_initial()
            self.fit(sorted(everyone - set(fold)), fold, self.config.epochs, False)
            k, n = self.module.holdout_record
            kls.append(k)
            nlls = None if n is None or nlls is None else [*nlls, n]
            out, target = self.module.holdout_outputs
            logits.append(out)
            targets.append(target)

        def joined(per_fold: list[list[torch.Tensor]]) -> list[torch.Tensor]:
            return [torch.cat([f[e] for f in per_fold]) for e in range(len(per_fold[0]))]

        per_epoch = joined(kls)
        choice = choose_epoch(per_epoch, self.config.min_gain_se, joined(nlls) if nlls else None)
        return (choice, [float(k.double().mean()) for k in per_epoch],
                (joined(logits), torch.cat(targets)))

    def temperature(self, held_out: HeldOut | None) -> float:
        """The label-free temperature on held-out predictions: a student is surer of the inputs
        it was trained on (without a hold-out, on every calibration input)."""
        if held_out is not None:
            return fit_temperature(*held_out)
        _, _, logits, targets = self.module.divergences(self.every())
        return fit_temperature(logits, targets)
