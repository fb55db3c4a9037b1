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
    lr : float or None
        Adam learning rate of the trainable parameters. ``None`` (default): scaled to the
        undistilled student's distance to the teacher, :math:`\mathrm{lr} = \mathrm{lr\_scale}
        \sqrt{\overline{\mathrm{KL}}_0}` with :math:`\overline{\mathrm{KL}}_0` its mean KL on
        the calibration inputs. Adam moves every parameter by about ``lr`` per step whatever its
        gradient, and the displacement that undoes a quantization error grows like the logits'
        distance, :math:`\sqrt{2\,\mathrm{KL}}` to first order: a fixed ``lr`` that suits a
        2-bit student overshoots a 3-bit one, already close to its teacher.
    lr_scale : float
        The factor of ``lr=None``.
    batch_size : int or None
        Distillation batch size; ``None``: that of the calibration batches.
    precompute_teacher : bool
        Run the teacher once per calibration sample before training (else once per step).
    holdout : float
        Fraction of the calibration inputs held out of training to choose the epoch: after
        each epoch the KL to the teacher on them is measured per input. The epoch with the
        lowest mean is kept only if its gain over the undistilled epoch 0 exceeds
        ``min_gain_se`` paired standard errors and, where the calibration batches carry labels,
        so does its gain in hold-out label NLL; otherwise the student stays undistilled
        (:func:`~bayesq_lightning.distillation.choose_epoch`). A hold-out under
        :data:`~bayesq_lightning.distillation.MIN_HOLDOUT` inputs cannot make that choice: one
        warning, and the student stays undistilled. ``0``: train on all, keep the last epoch.
    cross_fit : bool
        With ``holdout > 0``: hold out each of ``max(2, round(1 / holdout))`` folds in turn, so every
        calibration input is held out once and the choice rests on all of them; then train on
        all inputs for the chosen number of epochs (one training per fold, and one more). ``False``: one hold-out, the student at its chosen epoch.
    min_gain_se : float
        How many paired standard errors of the per-input hold-out differences (KL, and label
        NLL where labelled) the chosen epoch's mean gains must exceed; ``0``: any gain.
    fit_temperature : bool
        After distillation, fit one temperature on the student's logits to the teacher, with
        no label, on held-out predictions (the folds' at the kept epoch; all calibration inputs
        with ``holdout=0``) (:func:`~bayesq_lightning.distillation.
        fit_temperature`), and apply it: the model divides its logits (or ``.logits``) by it,
        the artifact and transformers' ``quantization_config`` store it, and every loader
        applies it again. Off by default: ``benchmarks/distill.py`` shows it lowering NLL
        everywhere and ECE where the student stays undistilled, but not ECE after distillation
        at the tightest budgets.
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
    lr: float | None = None
    lr_scale: float = 5e-4
    batch_size: int | None = None
    precompute_teacher: bool = True
    holdout: float = 0.2
    cross_fit: bool = True
    min_gain_se: float = 2.0
    fit_temperature: bool = False
    train: tuple[str, ...] = TRAINABLE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher={self.teacher!r} is not one of {TEACHERS}")
        if self.predictive not in PREDICTIVES:
            raise ValueError(f"predictive={self.predictive!r} is not one of {PREDICTIVES}")
        for name in ("posterior_temperature", "temperature", "lr", "lr_scale"):
            value = getattr(self, name)
            if value is None and name in ("posterior_temperature", "lr"):
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
                             "(default 2.0)")
        for name in ("cross_fit", "fit_temperature"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if isinstance(self.train, str):
            self.train = (self.train,)
        self.train = tuple(self.train)
        unknown = [t for t in self.train if t not in TRAINABLE]
        if unknown or not self.train:
            raise ValueError(f"train={self.train!r}: choose a non-empty subset of {TRAINABLE}")

    def to_dict(self) -> dict:
        return asdict(self)
