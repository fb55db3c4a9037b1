r"""A fitted logit temperature, applied to a model's outputs and carried by its artifact.

The packed model holds it as a forward hook on the module whose outputs are the logits (the
root that was distilled, or a transformers model when loaded alone): a ``Tensor`` output
becomes ``z / tau``, an output with a ``logits`` attribute (transformers) gets
``logits / tau``. The value lives in the hook object only, so a deep copy of the model carries
it, and :func:`set_logit_temperature` replaces rather than stacks. Writers read it with
:func:`logit_temperature`; the manifest and transformers' ``quantization_config`` store it as
``logit_temperature``, and every loader sets it again. A loss a transformers model computes
from ``labels`` inside its ``forward`` uses the logits before the temperature.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

TemperatureListener = Callable[[nn.Module, "float | None"], None]
# Registered once, at ``import bayesq_lightning`` (hf.install); they hold no state of a run.
TEMPERATURE_LISTENERS: list[TemperatureListener] = []


def on_temperature(listener: TemperatureListener) -> None:
    """Call ``listener(model, value)`` after each :func:`set_logit_temperature`."""
    if listener not in TEMPERATURE_LISTENERS:
        TEMPERATURE_LISTENERS.append(listener)


def check_temperature(value: object, where: str = "logit_temperature") -> float:
    """``value`` as a float, or ``ValueError`` unless it is a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{where}={value!r} is not a positive finite number")
    return float(value)


def logits_form(output: object) -> str | None:
    """``"tensor"`` or ``"logits"`` (an object with a ``logits`` tensor), else ``None``."""
    if isinstance(output, torch.Tensor):
        return "tensor"
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return "logits"
    return None


class LogitTemperature:
    """Forward hook dividing a module's logits by ``value``."""

    def __init__(self, value: float) -> None:
        self.value = check_temperature(value)

    def __call__(self, module: nn.Module, args, output):
        form = logits_form(output)
        if form == "tensor":
            return output / self.value
        if form == "logits":
            output.logits = output.logits / self.value
            return output
        raise TypeError(f"{type(module).__name__} returned {type(output).__name__}, not logits "
                        "(a tensor or an object with .logits): its logit temperature cannot apply;"
                        " remove it with set_logit_temperature(model, None)")


def logit_temperature(model: nn.Module) -> float | None:
    """The temperature on ``model``'s outputs, or ``None``: its own, or a submodule's (a
    transformers model loaded with one inside a wrapper that returns its logits)."""
    for m in model.modules():
        hooks = [h for h in m._forward_hooks.values() if isinstance(h, LogitTemperature)]
        if hooks:
            return hooks[-1].value
    return None


def set_logit_temperature(model: nn.Module, value: float | None) -> nn.Module:
    """Divide ``model``'s logits by ``value`` from now on (``None``: remove it); returns ``model``.

    Replaces a temperature set before, on the model or any submodule (never two at once), and
    tells the listeners (transformers' configs).
    """
    hook = None if value is None else LogitTemperature(value)  # validated before any change
    for m in model.modules():
        for key, h in list(m._forward_hooks.items()):
            if isinstance(h, LogitTemperature):
                del m._forward_hooks[key]
    if hook is not None:
        model.register_forward_hook(hook)
    for listener in TEMPERATURE_LISTENERS:
        listener(model, None if hook is None else hook.value)
    return model
