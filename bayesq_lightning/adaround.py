r"""AdaRound (Nagel et al., 2020): rounding learned layer by layer on a fixed grid.

A layer's weights ``W`` (rows, cols) sit on a grid with step ``s``, float zero ``z`` and codes
in ``[0, qmax]``: a stored weight is ``s (q - z)``. AdaRound keeps the grid and learns, for
each weight, whether its code is ``floor(W/s + z)`` or one above, through the rectified sigmoid

.. math::

    h(V) = \mathrm{clip}(\sigma(V)(\zeta - \gamma) + \gamma, 0, 1), \qquad
    \tilde W(V) = s\,(\mathrm{clip}(\lfloor W/s + z \rfloor + h(V), 0, q_{max}) - z),

with :math:`\zeta = 1.1, \gamma = -0.1`. ``V`` starts where ``h`` is the fractional part of
``W/s + z`` (so ``W~ = W`` inside the range) and minimises, by Adam,

.. math::

    \frac{1}{N}\sum_n \| f(W x_n + b) - f(\tilde W x^q_n + b) \|^2
    + \lambda \sum_{ij} \bigl(1 - |2 h(V_{ij}) - 1|^{\beta}\bigr),

where ``x`` is the layer's input in the FP32 model, ``x^q`` its input once the layers before
it (in forward order) hold their learned weights (the paper's asymmetric reconstruction), and
``f`` the elementwise activation module that directly consumes the layer's output, else the
identity. Each iteration draws ``batch`` rows of the input: token vectors for a Linear layer,
images for a Conv2d. The regulariser is off for the first ``WARMUP`` of the iterations; then
``beta`` anneals from 20 to 2 along a cosine, pushing every ``h`` to 0 or 1. The codes are then
``floor(W/s + z) + 1[h >= 0.5]``, clipped to the grid.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .batches import batch_inputs, fp32_logits_copy
from .progress import progress as show_progress
from .quantizers import dequantize, expand_groups
from .result import BlockResult

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch
LAMBDA = 0.01  # weight of the rounding regulariser (the paper's)
BETA = (20.0, 2.0)  # the regulariser's exponent, annealed from the first to the second
WARMUP = 0.2  # share of the iterations without the regulariser
LR = 1e-2  # Adam's step on V

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU,
               nn.Tanh, nn.Sigmoid, nn.Hardsigmoid, nn.Mish, nn.Softplus)


@dataclass(frozen=True)
class Grid:
    """A layer's fixed grid, expanded per weight: ``W ~ s (q - z)``, ``q`` in ``[0, qmax]``."""

    s: Tensor  # (rows, cols)
    z: Tensor  # (rows, cols)
    qmax: Tensor  # (rows, 1)

    @classmethod
    def of_blocks(cls, blocks: Sequence[BlockResult], cols: int) -> Grid:
        s, z, qmax = [], [], []
        for b in blocks:
            if b.quantizer != "uniform":
                raise ValueError("AdaRound learns rounding on uniform grids only")
            s.append(expand_groups(b.scale.float(), cols, b.group_size))
            z.append(expand_groups(b.zero.float(), cols, b.group_size))
            qmax.append(torch.full((b.rows[1] - b.rows[0], 1), float(2 ** b.bits - 1)))
        return cls(torch.cat(s), torch.cat(z), torch.cat(qmax))

    def floor_and_rest(self, W: Tensor) -> tuple[Tensor, Tensor]:
        u = W / self.s + self.z
        return u.floor(), u - u.floor()


def rectified_sigmoid(V: Tensor) -> Tensor:
    return (torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def _initial_V(rest: Tensor) -> Tensor:
    """``V`` with ``h(V) = rest`` (``rest`` in ``[0, 1)``)."""
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def _beta(t: float) -> float:
    """The regulariser's exponent at progress ``t`` in ``[0, 1]`` after the warm-up."""
    hi, lo = BETA
    return lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * t))


def layer_forward(module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """``module``'s own forward on ``x`` with ``weight`` (``(rows, cols)``) in place of its
    weight (its padding, stride, groups and bias as they are)."""
    return torch.func.functional_call(module, {"weight": weight.reshape(module.weight.shape)},
                                      (x,))


def _affine(grid: Grid, base: Tensor) -> tuple[Tensor, Tensor]:
    """``A, B`` with ``W~ = A + B h`` for every ``h`` in ``[0, 1]``: where ``base + h`` can leave
    ``[0, qmax]`` the code is that bound for every ``h``, so such a weight is constant
    (``B = 0``), and the others move with slope ``s``."""
    inside = ((base >= 0) & (base + 1 <= grid.qmax)).float()
    return grid.s * (torch.minimum(base.clamp_min(0), grid.qmax) - grid.z), grid.s * inside


@torch.no_grad()
def _grad_V(dW: Tensor, B: Tensor, sig: Tensor, r: Tensor, beta: float | None) -> Tensor:
    """The gradient in ``V`` of the loss whose gradient in ``W~`` is ``dW``, plus the
    regulariser's where ``beta`` is given; ``sig = sigmoid(V)``, ``r`` is ``h`` before its clip.

    Written out rather than left to autograd: on a weight-sized ``V`` autograd's saved tensors
    cost several times the step itself. ``dW`` and ``sig`` are overwritten.
    """
    dh = dW.mul_(B)
    if beta is not None:  # d/dh of lambda (1 - |2h - 1|^beta), |t|^(beta - 1) as exp(log):
        t = r.clamp(0, 1).mul_(2).sub_(1)  # faster than pow on CPU
        dh.add_(torch.copysign(t.abs().log_().mul_(beta - 1).exp_(), t),
                alpha=-2 * beta * LAMBDA)
    # h's clip passes dh where 0 < r < 1 (clamp's own backward: a boolean mask costs an order
    # of magnitude more on CPU); then dr/dV = (zeta - gamma) sig (1 - sig)
    dr = torch.ops.aten.hardtanh_backward(dh, r, 0.0, 1.0)
    return dr.mul_(sig).mul_(sig.neg_().add_(1)).mul_(ZETA - GAMMA)


def learn_rounding(module: nn.Module, W: Tensor, grid: Grid, x: Tensor, x_q: Tensor,
                   activation: nn.Module | None, iters: int, batch: int,
                   seed: int = 0) -> tuple[Tensor, Tensor]:
    """AdaRound's codes of ``W`` on ``grid`` and the final ``h(V)`` (before hard rounding).

    ``x`` and ``x_q`` hold the layer's FP32 and quantized-model inputs, one row (token vector or
    image) per first index; ``batch <= len(x)``.

    Autograd runs only from the loss to ``W~`` (batch-sized work); :func:`_grad_V` takes it
    on to ``V``.
    """
    f = activation or nn.Identity()
    base, rest = grid.floor_and_rest(W)
    A, B = _affine(grid, base)
    V = _initial_V(rest)
    opt = torch.optim.Adam([V], lr=LR)
    gen = torch.Generator().manual_seed(seed)
    warm = int(WARMUP * iters)
    for it in range(iters):
        idx = torch.randint(len(x), (batch,), generator=gen).to(x.device)
        with torch.no_grad():
            target = f(layer_forward(module, x[idx], W))
            sig = torch.sigmoid(V)
            r = sig.mul(ZETA - GAMMA).add_(GAMMA)  # h before its clip to [0, 1]
            W_t = torch.addcmul(A, B, r.clamp(0, 1)).requires_grad_(True)
        with torch.enable_grad():
            out = f(layer_forward(module, x_q[idx], W_t))
            (dW,) = torch.autograd.grad((out - target).pow(2).sum(1).mean(), W_t)
        beta = _beta((it - warm) / max(iters - warm, 1)) if it >= warm else None
        V.grad = _grad_V(dW, B, sig, r, beta)
        opt.step()
    with torch.no_grad():
        h = rectified_sigmoid(V)
        codes = torch.minimum((base + (h >= 0.5).float()).clamp_min(0), grid.qmax)
    return codes, h


class _Stop(Exception):
    """Raised by a hook once it holds the input it waited for: the rest of the forward is
    not needed."""


@torch.no_grad()
def _inputs_of(net: nn.Module, module: nn.Module, inputs: list) -> Tensor:
    """``module``'s first input in each forward of ``net``, stacked: token rows for a Linear,
    images for a Conv2d."""
    seen: list[Tensor] = []

    def hook(_m, args):
        seen.append(args[0].detach())
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for x in inputs:
            try:
                net(x)
            except _Stop:
                pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError("AdaRound: the layer never ran on the calibration batches")
    if isinstance(module, nn.Linear):
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in seen])
    return torch.cat(seen)


@torch.no_grad()
def _forward_order(net: nn.Module, modules: dict[str, nn.Module], x
                   ) -> tuple[list[str], dict[str, nn.Module]]:
    """The layers ``modules`` in the order their forwards first run on ``x``, and, for each,
    the elementwise activation module that directly consumes its output (if any)."""
    order: list[str] = []
    pending: dict[int, str] = {}  # id of a layer's output tensor -> layer name
    follows: dict[str, nn.Module] = {}
    by_module = {id(m): n for n, m in modules.items()}

    def post(m, _args, out):
        name = by_module[id(m)]
        if name not in order:
            order.append(name)
            pending[id(out)] = name

    def act(m, args):
        name = pending.get(id(args[0])) if args else None
        if name is not None and name not in follows:
            follows[name] = m

    handles = [m.register_forward_hook(post) for m in modules.values()]
    handles += [m.register_forward_pre_hook(act) for m in net.modules()
                if isinstance(m, ACTIVATIONS) or type(m).__name__.endswith("Activation")]
    try:
        net(x)
    finally:
        for h in handles:
            h.remove()
    return order + [n for n in modules if n not in order], follows


def adaround_layers(model: nn.Module, batches: list, blocks: dict[str, list[BlockResult]],
                    iters: int, batch: int, seed: int = 0, progress: bool = False
                    ) -> tuple[dict[str, list[BlockResult]], dict[str, dict]]:
    """Every layer's blocks with codes learned by AdaRound, in forward order.

    Parameters
    ----------
    model : nn.Module
        The FP32 model (left untouched).
    batches : list
        Calibration batches.
    blocks : dict
        Layer name -> its blocks in row order (uniform grids; the codes are replaced).
    iters, batch : int
        Adam iterations per layer, and input rows (token vectors or images) each draws;
        ``batch`` is clamped to the rows available, with one warning.

    Returns
    -------
    (dict, dict)
        The new blocks per layer (an Embedding's unchanged), and per layer ``{"rows", "activation", "frac_decided"}``:
        the input rows it learned from, the activation its loss passed through, and the share
        of ``h(V)`` within 1e-3 of 0 or 1 before the hard rounding.
    """
    fp32, device, modules = fp32_logits_copy(model, share_weights=True)
    work, _, work_modules = fp32_logits_copy(model)  # holds the learned weights as it goes
    inputs = batch_inputs(batches, device)
    # an embedding's lookups have no rounding to learn: its rows keep their nearest codes
    learned = {n: b for n, b in blocks.items() if isinstance(modules[n], (nn.Linear, nn.Conv2d))}
    out = {n: b for n, b in blocks.items() if n not in learned}
    order, follows = _forward_order(fp32, {n: modules[n] for n in learned}, inputs[0])
    stats, warned = {}, False
    for name in show_progress(order, progress, "adaround layers"):
        module, w_module = modules[name], work_modules[name]
        x, x_q = _inputs_of(fp32, module, inputs), _inputs_of(work, w_module, inputs)
        if batch > len(x) and not warned:
            warnings.warn(f"adaround_batch={batch} is larger than the calibration set's "
                          f"{len(x)} input rows of layer {name!r}; each iteration draws "
                          f"{len(x)}", stacklevel=2)
            warned = True
        W = module.weight.detach().reshape(module.weight.shape[0], -1)
        grid = Grid.of_blocks(learned[name], W.shape[1])
        grid = Grid(*(t.to(W.device) for t in (grid.s, grid.z, grid.qmax)))
        with torch.enable_grad():
            codes, h = learn_rounding(module, W, grid, x, x_q, follows.get(name), iters,
                                      min(batch, len(x)), seed)
        out[name] = [replace(b, codes=codes[b.rows[0]:b.rows[1]].to(torch.uint8).cpu())
                     for b in learned[name]]
        decided = ((h < 1e-3) | (h > 1 - 1e-3)).float().mean()
        stats[name] = {"rows": len(x), "activation": type(follows[name]).__name__
                       if name in follows else None, "frac_decided": float(decided)}
        w_q = torch.cat([dequantize(b) for b in out[name]]).to(W.device)
        w_module.weight.data.copy_(w_q.reshape(w_module.weight.shape))
    return out, stats
