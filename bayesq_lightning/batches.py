"""Batch and model plumbing shared by every stage: inputs, targets, calibration sets, fp32 copies.

Calibration loaders yield ``(inputs, targets)`` tuples, bare inputs or dict batches
(HuggingFace style, ``labels`` key); every stage reads them through :func:`split_batch`.
Every stage that runs the model on calibration data does so on :func:`fp32_logits_copy`, never on
the caller's model.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable, Mapping

import torch
from torch import nn


def clone_module(model: nn.Module, shared: Iterable[nn.Parameter] = ()) -> nn.Module:
    """A deep copy of ``model`` (never its Trainer), mode and dtypes kept, that shares nothing
    with it but the storage of the parameters in ``shared``.

    Each of those becomes a new ``Parameter`` (its own ``requires_grad`` and ``.grad``) over
    ``model``'s storage: for a copy that only reads those weights, or replaces them at once
    (buffers are always copied: a module may update them in a forward pass).
    """
    memo: dict[int, object] = {}
    for attr in ("_trainer", "_fabric"):  # a LightningModule must not drag its Trainer along
        ref = model.__dict__.get(attr)
        if ref is not None:
            memo[id(ref)] = None
    for p in shared:
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def clone_fp32(model: nn.Module, share_weights: bool = False) -> nn.Module:
    """An fp32 deep copy in eval mode that shares nothing with ``model`` (nor its Trainer);
    ``share_weights``: its fp32 parameters read ``model``'s storage (:func:`clone_module`)."""
    return clone_module(model, model.parameters() if share_weights else ()).float().eval()


def fp32_logits_copy(model: nn.Module, share_weights: bool = False
                     ) -> tuple[LogitsModel, torch.device, dict[str, nn.Module]]:
    """An fp32 eval copy of ``model`` returning logits, its device, and its modules by name.

    Module names are those of ``model`` (the copy's ``named_modules`` without the wrapper).
    ``share_weights`` (statistics passes, which never write a weight): fp32 parameters are not
    copied, so the copy costs no second model in memory.
    """
    net = LogitsModel(clone_fp32(model, share_weights))
    return net, next(net.parameters()).device, dict(net.model.named_modules())


def forward_checked(net: nn.Module, x, index: int):
    """``net(x)`` for calibration batch ``index``; any failure means the batch is not the
    model's input, which the error says (rather than a shape error from deep inside)."""
    try:
        return net(x)
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise  # the batch fits the model; the device does not
    except Exception as exc:
        raise ValueError(
            f"the curvature/calibration batches do not fit the model (batch {index}: "
            f"{type(exc).__name__}: {exc}); pass batches of the model's input form: (inputs, "
            "targets) tuples, bare inputs or dict batches, all of a shape the model takes"
        ) from exc


def largest_input(batches: list) -> float:
    """The largest absolute floating input value over ``batches`` (for overflow messages)."""
    top = 0.0
    for b in batches:
        x = split_batch(b)[0]
        for t in (x.values() if isinstance(x, Mapping) else [x]):
            if torch.is_tensor(t) and t.is_floating_point() and t.numel():
                top = max(top, float(t.detach().abs().max()))
    return top


def batch_inputs(batches: list, device: torch.device) -> list:
    """The inputs of every batch on ``device``, floating tensors in fp32 (labels dropped)."""
    return [inputs_to(split_batch(b)[0], device, torch.float32) for b in batches]


class LogitsModel(nn.Module):
    """Presents any classifier as ``f(x) -> logits (B, C)``.

    Dict batches (labels removed) reach the model in whichever of the two conventions its
    ``forward`` takes, read from its signature: ``model(**inputs)`` (HuggingFace models: the
    keys are parameter names, or it takes ``**kwargs``) or ``model(inputs)`` (a module whose
    ``forward`` takes the batch dict). ``dict_forward="kwargs"`` / ``"dict"`` overrides the
    choice. Outputs with a ``logits`` attribute (HuggingFace) are unwrapped.
    """

    def __init__(self, model: nn.Module, label_key: str = "labels",
                 dict_forward: str = "auto") -> None:
        super().__init__()
        if dict_forward not in ("auto", "kwargs", "dict"):
            raise ValueError(f"dict_forward={dict_forward!r} is not 'auto', 'kwargs' or 'dict'")
        self.model = model
        self.label_key = label_key
        self.dict_forward = dict_forward

    def forward(self, x):
        if isinstance(x, Mapping):
            inputs = {k: v for k, v in x.items() if k != self.label_key}
            if takes_kwargs(self.model, inputs) if self.dict_forward == "auto" else (
                    self.dict_forward == "kwargs"):
                out = self.model(**inputs)
            else:
                out = self.model(inputs)
        else:
            out = self.model(x)
        return getattr(out, "logits", out)


def takes_kwargs(model: nn.Module, inputs: Mapping) -> bool:
    """Whether ``model.forward`` takes dict ``inputs`` as keywords (else as one dict argument)."""
    params = inspect.signature(model.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return True
    names = {p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL}
    return set(inputs) <= names


def split_batch(batch) -> tuple[object, torch.Tensor | None]:
    """``(inputs, targets or None)`` of a tuple/list, bare tensor or HuggingFace dict batch."""
    if isinstance(batch, Mapping):
        return batch, batch.get("labels")
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def batch_size_of(inputs) -> int:
    if isinstance(inputs, Mapping):
        return len(next(iter(inputs.values())))
    return len(inputs)


def calibration_samples(loader, calib_batches: int, what: str = "calibration loader"
                        ) -> tuple[list, int]:
    """The first ``calib_batches`` batches of ``loader``, as a list of batches, and their size.

    ``what`` names the loader in the error raised when it yields no samples.
    """
    batches, n = [], 0
    for i, batch in enumerate(loader):
        if i >= calib_batches:
            break
        x = split_batch(batch)[0]
        _check_finite_inputs(x, i, what)
        batches.append(batch)
        n += batch_size_of(x)
    if n == 0:
        raise ValueError(
            f"the {what} yielded no samples; pass a DataLoader with at least one "
            "non-empty batch (calib_batches counts batches from its start)"
        )
    return batches, n


def _check_finite_inputs(x, index: int, what: str) -> None:
    """NaN or inf in a batch's floating inputs would poison every statistic; name the batch."""
    items = x.items() if isinstance(x, Mapping) else [("inputs", x)]
    for key, v in items:
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).reshape(len(v), -1).any(1).sum()) if v.dim() else 1
            raise ValueError(
                f"batch {index} of the {what} has NaN or inf in its {key} ({bad} sample(s)); "
                "drop or clean those samples before quantizing"
            )


def inputs_to(x, device, dtype: torch.dtype | None = None):
    """Move a tensor or a mapping of tensors to ``device``; cast floating ones to ``dtype``."""
    def move(v):
        if not torch.is_tensor(v):
            return v
        v = v.to(device)
        return v.to(dtype) if dtype is not None and v.is_floating_point() else v

    if isinstance(x, Mapping):
        return {k: move(v) for k, v in x.items()}
    return move(x)
