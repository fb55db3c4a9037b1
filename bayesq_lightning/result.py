"""Plain result records of a quantization run.

Every stage after allocation reads these: the in-memory model, the report, packing and the
artifact. A block's integer ``codes`` together with its quantizer parameters are the whole truth
about its weights; :func:`bayesq_lightning.quantizers.dequantize` is the one function that turns
them back into floats, used by every consumer so that all of them agree bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class BlockResult:
    """One block: a contiguous slice of output channels that shares one bit-width.

    Attributes
    ----------
    rows : tuple[int, int]
        ``(start, stop)`` output-channel range of the layer's weight.
    bits : int
        Bit-width of every code in the block.
    quantizer : str
        ``"uniform"`` (levels ``scale * (k - zero)``) or ``"nonuniform"`` (codebook levels).
    group_size : int or None
        Input columns sharing one scale/zero; ``None`` means one per output channel.
    codes : torch.Tensor
        ``uint8`` codes in ``[0, 2**bits)``, shape ``(stop - start, prod(weight.shape[1:]))``.
    scale, zero : torch.Tensor or None
        fp16, shape ``(rows, n_groups)`` for the uniform quantizer.
    codebook : torch.Tensor or None
        fp16 levels, shape ``(2**bits,)`` or ``(rows, 2**bits)`` for the non-uniform quantizer.
    """

    rows: tuple[int, int]
    bits: int
    quantizer: str
    group_size: int | None
    codes: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    codebook: torch.Tensor | None = None

    @property
    def n_weights(self) -> int:
        return self.codes.numel()

    @property
    def n_meta(self) -> int:
        """Number of fp16 metadata values (scales, zeros, codebook levels)."""
        return sum(t.numel() for t in (self.scale, self.zero, self.codebook) if t is not None)


@dataclass
class LayerResult:
    """Quantization outcome of one ``nn.Linear`` / ``nn.Conv2d`` layer."""

    name: str
    kind: str  # "linear" | "conv2d"
    weight_shape: tuple[int, ...]
    blocks: list[BlockResult]
    expected_loss: float
    bytes: int

    @property
    def n_weights(self) -> int:
        return sum(b.n_weights for b in self.blocks)

    @property
    def bits(self) -> int | None:
        """The layer's bit-width when it is a single block (or all blocks agree), else None."""
        widths = {b.bits for b in self.blocks}
        return widths.pop() if len(widths) == 1 else None

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes / self.n_weights


@dataclass
class QuantizationResult:
    """What :func:`bayesq_lightning.quantize_model` returns.

    Attributes
    ----------
    model : nn.Module
        A new module whose quantized layers are ``QuantizedLinear`` / ``QuantizedConv2d`` with
        packed integer codes (see :mod:`bayesq_lightning.modules`).
    layers : list[LayerResult]
        Per quantized layer, in module order.
    bits_per_weight : float
        Achieved storage bits per quantized weight, metadata included (<= the budget).
    code_bits_per_weight : float
        Achieved bits per quantized weight counting the integer codes only.
    budget_bits : int
        The budget the allocator honoured, in bits over all quantized weights.
    info : dict
        Method, posterior structure and prior precision, backend, seconds per stage.
    posterior : Posterior or None
        The fitted posterior (``None`` for posterior-free baselines).
    tied : dict[str, str]
        ``{alias: owner}``: layers that hold the weight of a quantized layer and share its
        packed codes (quantized, stored and counted once, under the owner).
    skipped : dict[str, str]
        ``{layer: reason}``: weight layers left in floating point: unsupported types
        (``Embedding``, ``Conv1d``, ...) and Linear/Conv2d layers whose weight is tied to a
        module that is not quantized (e.g. tied input/output embeddings).
    """

    model: nn.Module
    layers: list[LayerResult]
    bits_per_weight: float
    code_bits_per_weight: float
    budget_bits: int
    info: dict[str, Any] = field(default_factory=dict)
    posterior: Any = field(default=None, repr=False)
    tied: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def n_weights(self) -> int:
        return sum(layer.n_weights for layer in self.layers)

    @property
    def total_bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    def layer(self, name: str) -> LayerResult:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no quantized layer named {name!r}; known: {[x.name for x in self.layers]}")

    def table(self) -> str:
        """The per-layer allocation as a fixed-width text table."""
        head = f"{'layer':<28} {'kind':<7} {'weights':>9} {'bits':>5} {'bits/w':>7} {'exp.loss':>11}"
        lines = [head, "-" * len(head)]
        for x in self.layers:
            bits = "mixed" if x.bits is None else str(x.bits)
            lines.append(
                f"{x.name:<28} {x.kind:<7} {x.n_weights:>9} {bits:>5} "
                f"{x.bits_per_weight:>7.3f} {x.expected_loss:>11.4g}"
            )
        lines.append(
            f"{'total':<28} {'':<7} {self.n_weights:>9} {'':>5} {self.bits_per_weight:>7.3f} "
            f"{sum(x.expected_loss for x in self.layers):>11.4g}"
        )
        lines += [f"tied   {alias} -> {owner} (shares its codes)"
                  for alias, owner in self.tied.items()]
        lines += [f"float  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)
