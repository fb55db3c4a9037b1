r"""Layer input statistics: ``H = X X^T / n`` of each quantized layer over calibration inputs.

GPTQ rounds under this matrix, and the K-FAC fit's input factor ``A`` is the same sum
(:mod:`~bayesq_lightning.posterior.kron`). The inputs are folded into per-layer sums by forward
hooks as each batch passes (GPTQ's ``add_batch``), so memory does not grow with the number of
calibration samples.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters.torch import conv_input_padding
from .batches import batch_inputs, forward_checked, fp32_logits_copy, largest_input


def conv_unfold(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Input patches ``(N, in * kh * kw, L)`` of ``module`` (its padding, padding mode,
    dilation and stride), rows in the column order of ``weight.flatten(1)`` group after group."""
    padding = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, conv_input_padding(module), mode=mode)
        padding = 0
    return F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding,
                    stride=module.stride)


def _conv_patches(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Input patches ``(N * L, in * kh * kw)`` in the column order of ``weight.flatten(1)``."""
    cols = conv_unfold(module, x)  # (N, in*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class SharedProducts:
    """The last input product of a forward pass, for the layers that read the same tensor.

    BERT's query, key and value layers (and any fan-out) receive one ``hidden_states`` object in
    a row: the first hook forms ``X^T X`` and the others reuse it. Identity is the tensor object
    itself (a weak reference, never ``id()`` or ``data_ptr()``: a view such as
    ``hidden_states[:, 0]`` shares the storage but not the values) together with its version
    counter (an in-place edit between the calls is a new input) and the layer's layout key (a
    convolution's patches depend on its hyperparameters). One entry: holding every input's
    product would keep a ``(cols, cols)`` matrix per distinct input alive through the pass.
    """

    def __init__(self) -> None:
        self._entry: tuple | None = None
        self._count = 0

    def product(self, x: Tensor, key: tuple, compute: Callable[[], Tensor]) -> tuple[int, Tensor]:
        """``(product id, X^T X)`` of input ``x`` under layout ``key``, formed once."""
        e = self._entry
        if e is not None and e[0]() is x and e[1] == x._version and e[2] == key:
            return e[3], e[4]
        value = compute()
        self._count += 1
        self._entry = (weakref.ref(x), x._version, key, self._count, value)
        return self._count, value


class InputStats:
    """Streaming sums of a layer's input statistics: ``S = sum X^T X`` and the row count ``n``.

    GPTQ's ``add_batch``: each batch's inputs are folded in by :meth:`add` and dropped, so memory
    is one ``(cols, cols)`` float64 sum per layer whatever the number of calibration samples
    (each call's product is formed in fp32; :meth:`sum_in_float32` halves it for a phase that
    holds other large tensors).
    ``n`` counts the rows of ``X`` (input vectors, tokens, patches), not samples, so batches,
    and ranks, with different sequence lengths or image sizes combine exactly.
    """

    def __init__(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            self.groups, self.cols = 1, module.in_features
        elif isinstance(module, nn.Conv2d):
            self.groups = module.groups
            self.cols = (module.in_channels // module.groups * module.kernel_size[0]
                         * module.kernel_size[1])
        else:
            raise TypeError(f"input_hessian supports nn.Linear and nn.Conv2d, not {type(module)}")
        self.module = module
        self.S: Tensor | None = None
        self.n = 0
        self.sum_dtype = torch.float64
        # the SharedProducts ids added, in order: equal lists are bitwise-equal sums
        self.products: list[int] | None = []
        if isinstance(module, nn.Conv2d):
            self.key: tuple = ("conv2d", module.kernel_size, module.stride, module.padding,
                               module.dilation, module.groups, module.padding_mode, self.cols)
        else:
            self.key = ("linear", self.cols)

    def sum_in_float32(self) -> None:
        """Hold the running sum in fp32 from here on: half its memory, for a phase that holds
        other large tensors beside it (the K-FAC fit adds its batches' inputs this way)."""
        self.sum_dtype = torch.float32
        if self.S is not None:
            self.S = self.S.float()

    @torch.no_grad()
    def add(self, x: Tensor | tuple[Tensor, ...], shared: SharedProducts | None = None) -> None:
        """Fold in one call's inputs (a tuple, as forward hooks see them, uses its first);
        with ``shared``, a product another layer formed from the same tensor is reused."""
        x = x[0] if isinstance(x, (tuple, list)) else x
        if shared is None:
            XtX, rows = self._product(x)
            self.products = None  # not comparable with other layers' sums any more
        else:
            pid, (XtX, rows) = shared.product(x, self.key, lambda: self._product(x))
            if self.products is not None:
                self.products.append(pid)
        # added into the float64 sum as it is (promoted element by element, no float64 copy)
        self.S = XtX.to(self.sum_dtype) if self.S is None else self.S.add_(XtX)
        self.n += rows

    def _product(self, x: Tensor) -> tuple[Tensor, int]:
        """One call's ``X^T X`` per group, ``(g, cols, cols)`` fp32, and its row count."""
        x = x.detach()
        if isinstance(self.module, nn.Conv2d):
            X = _conv_patches(self.module, x if x.dim() == 4 else x.unsqueeze(0))
        else:
            X = x.reshape(-1, self.cols)
        # one call's product in fp32, as GPTQ and K-FAC's input factor do (float64 products cost
        # twice the time); the running sum over calls in float64
        X = X.float().reshape(X.shape[0], self.groups, self.cols).transpose(0, 1)  # (g, n, c)
        return X.transpose(1, 2) @ X, X.shape[1]

    def hessian(self, reduce=None, release: bool = False) -> Tensor:
        """``H = S / n`` (float32); with ``reduce``, ``S`` and ``n`` summed over processes.

        ``release``: the running sum is divided in place and dropped, and the count reset (a
        later ``add`` starts afresh), so that ``H`` costs no second copy beside it, whoever else
        holds these statistics.
        """
        S, n = self.S, self.n
        if reduce is not None:  # every rank calls, also one that saw no inputs
            S = reduce(S if S is not None else torch.zeros(
                self.groups, self.cols, self.cols, dtype=self.sum_dtype,
                device=self.module.weight.device))
            n = int(reduce(torch.tensor(float(n), dtype=torch.float64, device=S.device)).item())
        if S is None or n == 0:
            raise ValueError("input_hessian got no inputs")
        if release:
            self.S, self.n = None, 0
            H = S.div_(n).float()
        else:
            H = (S / n).float()
        return H[0] if self.groups == 1 else H


@torch.no_grad()
def input_hessian(module: nn.Module, inputs_iter: Iterable[Tensor | tuple[Tensor, ...]]) -> Tensor:
    """GPTQ's input matrix ``H = X X^T / n`` of a layer over calibration inputs.

    ``n`` counts the rows of ``X^T``: input vectors for ``nn.Linear`` (every leading position,
    e.g. batch x tokens), patches for ``nn.Conv2d`` (images x output positions). So
    ``tr(dW H dW^T)`` is the mean squared output error per vector/patch. (The GPTQ reference
    uses ``2/n`` and counts images for convs; a constant factor that changes neither the rounding
    under ``gptq_gamma`` nor any comparison.) Each call's product in fp32, summed in float64 on
    the inputs' device (:class:`InputStats`), returned as float32.

    Parameters
    ----------
    module : nn.Linear or nn.Conv2d
        The layer; only its hyperparameters are read.
    inputs_iter : iterable of Tensor
        The layer's inputs (a tuple, as forward hooks see them, uses its first element).

    Returns
    -------
    Tensor
        ``(in, in)`` for Linear, ``(cols, cols)`` for a Conv2d with ``groups == 1`` and
        ``(groups, cols, cols)`` otherwise, ``cols = in / groups * kh * kw``.
    """
    stats = InputStats(module)
    for x in inputs_iter:
        stats.add(x)
    return stats.hessian()


def layer_input_hessians(
    model: nn.Module, batches: Sequence, names: Sequence[str], reduce=None
) -> dict:
    """:func:`input_hessian` of every named layer over the calibration batches, in one pass.

    The inputs are folded into per-layer sums by forward hooks on the unmodified (dense) model
    as each batch passes (:class:`InputStats`, GPTQ's ``add_batch``), so memory does not grow
    with the number of calibration samples beyond one batch's activations. With ``reduce`` (a
    cross-process sum) the sums and row counts are summed over processes: every rank gets
    ``sum S / sum n``, whatever each rank's sequence lengths or image sizes.
    """
    net, device, modules = fp32_logits_copy(model, share_weights=True)
    return streamed_input_hessians(net, device, {n: modules[n] for n in names}, batches,
                                   reduce)


@torch.no_grad()
def streamed_input_hessians(net: nn.Module, device: torch.device,
                            modules: dict[str, nn.Module], batches: Sequence,
                            reduce=None) -> dict:
    """:func:`layer_input_hessians` on a prepared network ``net`` (an fp32 logits model)
    whose layers ``modules`` (by name) are hooked."""
    return finish_input_hessians(stream_input_stats(net, device, modules, batches), batches,
                                 reduce)


@torch.no_grad()
def stream_input_stats(net: nn.Module, device: torch.device, modules: dict[str, nn.Module],
                       batches: Sequence) -> dict[str, InputStats]:
    """The :class:`InputStats` of the layers ``modules`` over ``batches``, one forward pass of
    ``net`` per batch; more can be added (K-FAC adds its own batches' inputs during its fit,
    :meth:`~bayesq_lightning.posterior.kron_factors.KronFactors.accumulate`)."""
    stats = {n: InputStats(m) for n, m in modules.items()}
    shared = SharedProducts()
    hooks = [m.register_forward_pre_hook(lambda _m, args, s=stats[n]: s.add(args, shared))
             for n, m in modules.items()]
    try:
        for i, batch in enumerate(batches):  # one batch on the device at a time
            forward_checked(net, batch_inputs([batch], device)[0], i)
    finally:
        for h in hooks:
            h.remove()
    return stats


def finish_input_hessians(stats: dict[str, InputStats], batches: Sequence, reduce=None,
                          share: bool = True) -> dict[str, Tensor]:
    """Every layer's ``H = S / n`` (summed over processes with ``reduce``), checked finite;
    ``batches`` only name the largest input in the error. ``share``: layers with equal sums
    from one input tensor get one ``H`` object (``False`` for a caller that edits them in
    place, as K-FAC's normalisation does its ``A``)."""
    # each layer's sum dropped once converted (also where the K-FAC operator still holds its
    # statistics): one at a time beside the fp32 results. Layers that added the same products
    # in the same order (one input tensor read by several layers) share one H: equal sums,
    # also after the reduce, which every rank runs for every layer.
    hessians: dict[str, Tensor] = {}
    first: dict[tuple, str] = {}
    for n in list(stats):
        st = stats.pop(n)
        trail = None if not (share and st.products) else (st.key, st.n, tuple(st.products))
        H = st.hessian(reduce, release=True)
        twin = first.get(trail) if trail is not None else None
        if twin is not None and torch.equal(hessians[twin], H):
            H = hessians[twin]
        elif trail is not None:
            first.setdefault(trail, n)
        hessians[n] = H
    # after the reduce: one rank's overflow reaches every rank, so all raise together
    bad = [n for n, h in hessians.items() if not torch.isfinite(h).all()]
    if bad:
        raise ValueError(
            f"the input statistics (X X^T) of layers {bad} are not finite: the calibration "
            f"inputs (largest |x| = {largest_input(batches):.3g}) overflow in fp32 on the way to "
            "them; normalise the calibration inputs as in training"
        )
    return hessians
