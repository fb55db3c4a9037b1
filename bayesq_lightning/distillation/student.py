r"""The student side of distillation: what trains, the loss, the data.

The student is the packed quantized model. Its integer codes never change; trainable are (per
:class:`~bayesq_lightning.distillation.DistillConfig` ``train``) the quantizer parameters of every packed
layer as fp32 masters (:func:`~bayesq_lightning.artifact.tuning.start_tuning`),
the packed layers' biases and the affine parameters of normalisation layers. Everything else is
frozen, and the student stays in eval mode (BatchNorm running statistics fixed, no dropout), so
processes that see the same gradients stay identical.

The loss, from inputs only:

.. math::

    \mathcal{L} = T^2\, \frac1B \sum_b \mathrm{KL}\big(p_t^{(T)}(x_b) \,\|\, p_s^{(T)}(x_b)\big),
    \qquad p^{(T)} = \mathrm{softmax}(\log p / T),

with :math:`p_t` the teacher's predictive and :math:`p_s` the student's softmax.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from ..artifact.modules import QUANTIZED_TYPES
from ..artifact.tuning import finish_tuning, start_tuning
from ..batches import batch_size_of, split_batch

TRAINABLE = ("scale", "zero", "codebook", "bias", "norm")
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
TEACHER_KEY = "_bayesq_teacher_log_probs"
INPUTS_KEY = "_bayesq_inputs"
LABELS_KEY = "_bayesq_labels"  # kept for the hold-out's veto only; the loss never reads them


def packed_layers(model: nn.Module) -> dict[str, nn.Module]:
    types = tuple(QUANTIZED_TYPES.values())
    return {n: m for n, m in model.named_modules() if isinstance(m, types)}


def trainable_count(model: nn.Module, train: tuple[str, ...]) -> int:
    """How many tensors :func:`start_student` would train (checked before touching anything)."""
    n = 0
    for m in packed_layers(model).values():
        n += sum(1 for s in m.specs for name in s.meta_shapes if name in train)
        n += int("bias" in train and m.bias is not None)
    if "norm" in train:
        n += sum(1 for m in model.modules() if isinstance(m, NORMS)
                 for p in m.parameters(recurse=False))
    return n


@dataclass
class StudentState:
    """What :func:`start_student` changed, for :func:`finish_student` to put back."""

    params: list[nn.Parameter]
    flags: list[tuple[nn.Parameter, bool]] = field(default_factory=list)


def check_student(model: nn.Module, train: tuple[str, ...]) -> None:
    """Raise unless ``model`` has packed layers and ``train`` selects something in it."""
    layers = packed_layers(model)
    if not layers:
        raise ValueError("the student has no packed layers (QuantizedLinear / QuantizedConv2d); "
                         "distil the model quantize_model returned (result.model)")
    if trainable_count(model, train) == 0:
        meta = sorted({n for m in layers.values() for s in m.specs for n in s.meta_shapes})
        raise ValueError(
            f"nothing to train: train={train} selects no parameter of this student (its packed "
            f"layers have {meta} metadata); include 'scale' / 'zero' for uniform or 'codebook' "
            "for non-uniform layers"
        )


def start_student(model: nn.Module, train: tuple[str, ...]) -> StudentState:
    """Freeze ``model`` except the ``train`` parts; returns the parameters to optimise."""
    check_student(model, train)  # before anything changes
    layers = packed_layers(model)
    state = StudentState(params=[], flags=[(p, p.requires_grad) for p in model.parameters()])
    model.requires_grad_(False)
    meta = tuple(t for t in train if t in ("scale", "zero", "codebook"))
    owners: dict[int, nn.Module] = {}  # first holder of each packed code buffer
    for m in layers.values():
        masters = start_tuning(m, meta)
        owner = owners.setdefault(id(m.block0_codes), m)
        if owner is m:
            state.params += masters
        else:  # tied layers share their codes: they share the trained metadata too
            for key, p in owner.named_parameters(recurse=False):
                if key.endswith("_master"):
                    setattr(m, key, p)
        if "bias" in train and m.bias is not None:
            m.bias.requires_grad_(True)
            state.params.append(m.bias)
    if "norm" in train:
        for m in model.modules():
            if isinstance(m, NORMS):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(True)
                    state.params.append(p)
    return state


def finish_student(model: nn.Module, state: StudentState | None = None, result=None) -> None:
    """Round the masters to fp16 into the packed buffers; restore the ``requires_grad`` flags.

    With ``result`` (the :class:`~bayesq_lightning.QuantizationResult` of ``model``), its block
    records are refreshed from the packed layers, so reports and exports describe the distilled
    weights.
    """
    layers = packed_layers(model)
    for m in layers.values():
        finish_tuning(m)
    if state is not None:
        for p, flag in state.flags:
            p.requires_grad_(flag)
    if result is not None:
        for x in result.layers:
            if x.name in layers:
                x.blocks = layers[x.name].blocks()


def distill_loss(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor,
                 temperature: float = 1.0, per_example: bool = False) -> torch.Tensor:
    """:math:`T^2` times the mean ``KL(teacher || student)`` at temperature ``T`` (per example
    with ``per_example=True``)."""
    if student_logits.shape != teacher_log_probs.shape:
        raise ValueError(f"student outputs {tuple(student_logits.shape)} and teacher outputs "
                         f"{tuple(teacher_log_probs.shape)} differ")
    t = (teacher_log_probs.float() / temperature).log_softmax(-1)
    s = (student_logits.float() / temperature).log_softmax(-1)
    if per_example:
        return temperature ** 2 * F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    return temperature ** 2 * F.kl_div(s, t, log_target=True, reduction="batchmean")


def student_inputs(batch):
    """The inputs of a batch, labels removed: the student never sees a label."""
    if isinstance(batch, Mapping) and INPUTS_KEY in batch:
        return batch[INPUTS_KEY]
    x, _ = split_batch(batch)
    if isinstance(x, Mapping):
        x = {k: v for k, v in x.items() if k != "labels"}
    return x


class DistillSet(Dataset):
    """Per-sample calibration inputs, with the teacher's log-probabilities when precomputed and
    the labels when the batches have them; batches collate to ``{INPUTS_KEY: x, TEACHER_KEY:
    log p, LABELS_KEY: y}`` (the keys present) or to ``x``. :func:`student_inputs` of a batch
    is ``x`` either way: the student and the loss never see a label."""

    def __init__(self, batches: list, teacher: nn.Module | None = None) -> None:
        self.items: list = []
        for batch in batches:
            x = student_inputs(batch)
            y = split_batch(batch)[1]
            t = None if teacher is None else teacher(x).cpu()
            # class ids only (one integer per sample): other targets give no label NLL
            class_ids = (isinstance(y, torch.Tensor) and y.dim() == 1
                         and not y.is_floating_point() and len(y) == batch_size_of(x))
            for i in range(batch_size_of(x)):
                xi = {k: v[i] for k, v in x.items()} if isinstance(x, Mapping) else x[i]
                item = {INPUTS_KEY: xi}
                if t is not None:
                    item[TEACHER_KEY] = t[i]
                if class_ids:
                    item[LABELS_KEY] = y[i]
                self.items.append(item if len(item) > 1 else xi)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]
