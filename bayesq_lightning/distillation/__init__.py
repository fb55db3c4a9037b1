"""Calibration-only distillation of a quantized model toward a teacher (no Lightning here).

The Lightning shells (``PosteriorDistillModule``, ``distill``, ``distill_model``) live in
:mod:`bayesq_lightning.lightning.distill`.
"""

from .config import DistillConfig
from .selection import MIN_HOLDOUT, EpochChoice, choose_epoch
from .student import distill_loss, finish_student, start_student
from .teachers import (
    FP32Teacher,
    GLMTeacher,
    SampleTeacher,
    Teacher,
    build_teacher,
    fp32_reference,
    tune_teacher,
)

__all__ = [
    "MIN_HOLDOUT",
    "DistillConfig",
    "EpochChoice",
    "FP32Teacher",
    "GLMTeacher",
    "SampleTeacher",
    "Teacher",
    "build_teacher",
    "choose_epoch",
    "distill_loss",
    "finish_student",
    "fp32_reference",
    "start_student",
    "tune_teacher",
]
