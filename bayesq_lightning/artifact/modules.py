"""The packed layers: ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding`` holding packed integer
weights.

Storage and decoding are :class:`~bayesq_lightning.artifact.storage.PackedLayer`'s; each layer
here adds its float op, which dequantizes in the input dtype (a Linear may take a stock integer
kernel instead, :mod:`~bayesq_lightning.artifact.dispatch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..result import LayerResult
from . import dispatch
from .manifest import BlockSpec, conv_options
from .storage import PackedLayer


class QuantizedLinear(PackedLayer):
    """``nn.Linear`` with packed integer weights; ``forward`` dequantizes in the input dtype.

    Parameters
    ----------
    weight_shape : sequence of int
        ``(out_features, in_features)``.
    specs : sequence of BlockSpec
        Block layouts tiling the output features in order.
    bias : bool
        Whether the layer has a bias.
    dtype : torch.dtype
        dtype of the bias.
    device : torch.device or str, optional
        Where the buffers live.
    cache_dequantized : bool
        Keep the decoded weight after the first forward (faster, costs a float weight of memory).
    """

    kind = "linear"
    float_type = nn.Linear

    def __init__(self, weight_shape: Sequence[int], specs: Sequence[BlockSpec], **kwargs) -> None:
        if len(weight_shape) != 2:
            raise ValueError(f"a linear weight is (out, in), got shape {tuple(weight_shape)}")
        super().__init__(weight_shape, specs, **kwargs)
        self.out_features, self.in_features = self.weight_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = dispatch.fast_linear(self, x)
        if y is not None:
            return y
        return F.linear(x, self._forward_weight(x.dtype), self._bias(x))

    def _float_layer(self) -> nn.Linear:
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class QuantizedConv2d(PackedLayer):
    """``nn.Conv2d`` with packed integer weights; ``forward`` dequantizes in the input dtype.

    Parameters
    ----------
    weight_shape : sequence of int
        ``(out_channels, in_channels // groups, kh, kw)``.
    specs : sequence of BlockSpec
        Block layouts tiling the output channels in order.
    stride, padding, dilation, groups
        As for ``nn.Conv2d`` (``padding`` may be ``"same"`` or ``"valid"``).
    padding_mode : str
        Only ``"zeros"`` is supported.
    **kwargs
        ``bias``, ``dtype``, ``device``, ``cache_dequantized`` as for :class:`QuantizedLinear`.
    """

    kind = "conv2d"
    float_type = nn.Conv2d

    def __init__(
        self,
        weight_shape: Sequence[int],
        specs: Sequence[BlockSpec],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        **kwargs,
    ) -> None:
        if len(weight_shape) != 4:
            raise ValueError(
                f"a conv2d weight is (out, in/groups, kh, kw), got {tuple(weight_shape)}"
            )
        if padding_mode != "zeros":
            raise NotImplementedError(
                f"padding_mode={padding_mode!r} is not supported by QuantizedConv2d; only 'zeros' "
                f"is: exclude this layer from quantization or use zero padding"
            )
        super().__init__(weight_shape, specs, **kwargs)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = int(groups)
        self.padding_mode = padding_mode
        self.out_channels = self.weight_shape[0]
        self.in_channels = self.weight_shape[1] * self.groups
        self.kernel_size = tuple(self.weight_shape[2:])

    @staticmethod
    def _float_options(module: nn.Module) -> dict:
        return conv_options(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            x,
            self._forward_weight(x.dtype),
            self._bias(x),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    def _float_layer(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                         bias=self.bias is not None, **conv_options(self))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, groups={self.groups}"
        )


class QuantizedEmbedding(PackedLayer):
    """``nn.Embedding`` with packed integer rows (one grid per row); ``forward`` looks the ids up
    in the decoded fp32 weight.

    Parameters
    ----------
    weight_shape : sequence of int
        ``(num_embeddings, embedding_dim)``.
    specs : sequence of BlockSpec
        Block layouts tiling the rows in order.
    **kwargs
        ``device``, ``cache_dequantized`` as for :class:`QuantizedLinear` (no bias).
    """

    kind = "embedding"
    float_type = nn.Embedding

    def __init__(self, weight_shape: Sequence[int], specs: Sequence[BlockSpec], **kwargs) -> None:
        if len(weight_shape) != 2:
            raise ValueError(f"an embedding weight is (num, dim), got shape {tuple(weight_shape)}")
        if kwargs.pop("bias", False):
            raise ValueError("an embedding has no bias")
        super().__init__(weight_shape, specs, bias=False, **kwargs)
        self.num_embeddings, self.embedding_dim = self.weight_shape

    @classmethod
    def from_float(cls, module: nn.Module, layer_result: LayerResult,
                   cache_dequantized: bool = False) -> QuantizedEmbedding:
        """Pack the blocks of ``layer_result`` for the ``nn.Embedding`` ``module``."""
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"layer {layer_result.name!r}: expected nn.Embedding, got "
                            f"{type(module).__name__}")
        if module.max_norm is not None:
            raise ValueError(f"layer {layer_result.name!r}: an embedding with max_norm rewrites "
                             "its weight when called and cannot be packed")
        float_layer = SimpleNamespace(weight=module.weight, bias=None, training=module.training)
        return cls._from_layer(float_layer, layer_result, cache_dequantized=cache_dequantized)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self._forward_weight(torch.float32))

    def _float_layer(self) -> nn.Embedding:
        return nn.Embedding(self.num_embeddings, self.embedding_dim)


QUANTIZED_TYPES: dict[str, type[PackedLayer]] = {
    "linear": QuantizedLinear,
    "conv2d": QuantizedConv2d,
    "embedding": QuantizedEmbedding,
}
FLOAT_TYPES: dict[str, type[nn.Module]] = {k: c.float_type for k, c in QUANTIZED_TYPES.items()}


def quantized_from_float(
    module: nn.Module, layer: LayerResult, cache: bool = False
) -> PackedLayer:
    """The packed replacement of one float layer."""
    cls = QUANTIZED_TYPES.get(layer.kind)
    if cls is None:
        raise ValueError(
            f"layer {layer.name!r}: unknown kind {layer.kind!r}; expected {list(QUANTIZED_TYPES)}"
        )
    return cls.from_float(module, layer, cache_dequantized=cache)
