"""``DistillConfig``: the options of calibration-only distillation, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .student import TRAINABLE
from .teachers import PREDICTIVES, TEACHERS


@dataclass
class DistillConfig:
    """Configuration of :func:`~bayesq_lightning.distill_model` and :func:`~bayesq_lightning.distill`.

    Attributes
    ----------
    teacher : {"posterior", "fp32"}
        ``"posterior"``: the posterior predictive :math:`E_{w \\sim q}\\, \\mathrm{softmax}(f(x; w))`;
        ``"fp32"``: the unquantized model's softmax (the control).
    predictive : {"glm", "samples"}
        How the posterior teacher forms its predictive. ``"glm"``: the last Linear layer's
        linearised (GLM) predictive with the probit link, from the layer's fitted posterior
        (closed form, one forward pass); ``"samples"``: the mean softmax of ``n_samples``
        networks drawn from the fitted posterior over all quantized layers.
    posterior_temperature : float or None
        Scales the posterior covariance of either predictive (``< 1`` narrows it). ``None``
        (default): the value with the lowest NLL on the labelled calibration batches, from a
        grid that includes the FP32 limit (the labels serve the teacher's fit, as they serve
        the posterior's; the distillation loss never sees them).
    n_samples : int
        Weight draws of ``predictive="samples"``.
    temperature : float
        Distillation temperature :math:`T` of ``T^2 KL(p_teacher^T || p_student^T)``.
    epochs : int
        Passes over the calibration data.
    lr : float
        Adam learning rate of the trainable parameters.
    batch_size : int or None
        Distillation batch size; ``None``: that of the calibration batches.
    precompute_teacher : bool
        Run the teacher once per calibration sample before training (else once per step).
    holdout : float
        Fraction of the calibration inputs held out of training to choose the epoch: after
        each epoch the KL to the teacher on them is measured per input (no label enters it).
        The epoch with the lowest mean is kept only if its gain over the undistilled epoch 0
        exceeds ``min_gain_se`` paired standard errors; otherwise the student stays
        undistilled. A hold-out under :data:`~bayesq_lightning.distillation.MIN_HOLDOUT`
        inputs cannot make that choice: one warning, and the student stays undistilled.
        ``0``: train on all, keep the last epoch.
    min_gain_se : float
        How many paired standard errors of the per-input hold-out KL difference the chosen
        epoch's mean gain must exceed; ``0`` (default): any gain.
    train : tuple of str
        What is trained, a subset of ``("scale", "zero", "codebook", "bias", "norm")``: the
        quantizer's scales, zero points and codebook levels (fp32 masters, stored as fp16), the
        quantized layers' biases, normalisation layers' affine parameters.
    seed : int
        Seeds posterior draws and the data order.
    """

    teacher: str = "posterior"
    predictive: str = "glm"
    posterior_temperature: float | None = None
    n_samples: int = 16
    temperature: float = 1.0
    epochs: int = 5
    lr: float = 1e-4
    batch_size: int | None = None
    precompute_teacher: bool = True
    holdout: float = 0.2
    min_gain_se: float = 0.0
    train: tuple[str, ...] = TRAINABLE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher={self.teacher!r} is not one of {TEACHERS}")
        if self.predictive not in PREDICTIVES:
            raise ValueError(f"predictive={self.predictive!r} is not one of {PREDICTIVES}")
        for name in ("posterior_temperature", "temperature", "lr"):
            value = getattr(self, name)
            if value is None and name == "posterior_temperature":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a positive finite number "
                                 f"(default {type(self).__dataclass_fields__[name].default})")
        for name in ("n_samples", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.batch_size is not None and (int(self.batch_size) != self.batch_size
                                            or self.batch_size < 1):
            raise ValueError(f"batch_size={self.batch_size!r} must be a positive integer or None")
        if isinstance(self.holdout, bool) or not (0.0 <= self.holdout < 1.0):
            raise ValueError(f"holdout={self.holdout!r} must be a fraction in [0, 1)")
        if isinstance(self.min_gain_se, bool) or not isinstance(self.min_gain_se, (int, float)) \
                or not (math.isfinite(self.min_gain_se) and self.min_gain_se >= 0):
            raise ValueError(f"min_gain_se={self.min_gain_se!r} must be a finite number >= 0 "
                             "(default 0.0)")
        if isinstance(self.train, str):
            self.train = (self.train,)
        self.train = tuple(self.train)
        unknown = [t for t in self.train if t not in TRAINABLE]
        if unknown or not self.train:
            raise ValueError(f"train={self.train!r}: choose a non-empty subset of {TRAINABLE}")

    def to_dict(self) -> dict:
        return asdict(self)
