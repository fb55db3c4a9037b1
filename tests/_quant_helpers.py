"""Build quantization results by hand (min-max round-to-nearest) for packing/export tests."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from bayesq_lightning.quantizers import block_storage_bits, dequantize, design_uniform
from bayesq_lightning.result import BlockResult, LayerResult, QuantizationResult


def weight_2d(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1)


def rtn_block(
    w2d: torch.Tensor, rows: tuple[int, int], bits: int, group_size: int | None = None
) -> BlockResult:
    """A uniform block of rows ``[start, stop)`` by min-max round-to-nearest."""
    grid = design_uniform(w2d[rows[0] : rows[1]], bits, group_size=group_size)
    return BlockResult(rows, bits, "uniform", group_size, grid.codes, grid.scale, grid.zero)


def nonuniform_block(
    w2d: torch.Tensor, rows: tuple[int, int], bits: int, per_row: bool = False
) -> BlockResult:
    """A codebook block: fp16 sorted quantile levels, codes = nearest level."""
    w = w2d[rows[0] : rows[1]].float()
    q = torch.linspace(0, 1, 2**bits)
    if per_row:
        book = torch.quantile(w, q, dim=1).T.contiguous().half().sort(dim=1).values  # (rows, L)
        levels = book.float().unsqueeze(1)  # (rows, 1, L) against w (rows, cols, 1)
    else:
        book = torch.quantile(w.flatten(), q).half().sort().values  # (L,)
        levels = book.float()
    codes = (w.unsqueeze(-1) - levels).abs().argmin(dim=-1).to(torch.uint8)
    return BlockResult(rows, bits, "nonuniform", None, codes, codebook=book)


def split_rows(n_rows: int, n_blocks: int) -> list[tuple[int, int]]:
    """Contiguous, uneven-if-needed row slices covering ``[0, n_rows)``."""
    edges = torch.linspace(0, n_rows, n_blocks + 1).round().long().tolist()
    return list(zip(edges[:-1], edges[1:], strict=True))


def rtn_layer(
    name: str,
    module: nn.Module,
    bits: int | Sequence[int],
    group_size: int | None = None,
    nonuniform: Sequence[int] = (),
    per_row_codebook: bool = False,
) -> LayerResult:
    """LayerResult of ``module`` with one block per entry of ``bits`` (row slices).

    Blocks whose index is in ``nonuniform`` get a hand-made codebook instead of a uniform grid.
    """
    bits = [bits] if isinstance(bits, int) else list(bits)
    w2d = weight_2d(module)
    blocks = []
    for i, (rows, b) in enumerate(zip(split_rows(w2d.shape[0], len(bits)), bits, strict=True)):
        if i in nonuniform:
            blocks.append(nonuniform_block(w2d, rows, b, per_row_codebook))
        else:
            blocks.append(rtn_block(w2d, rows, b, group_size))
    kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
    n_bytes = sum(block_storage_bits(b) for b in blocks) // 8
    return LayerResult(name, kind, tuple(module.weight.shape), blocks, 0.0, n_bytes)


def rtn_layers(model: nn.Module, bits: int | Sequence[int] = 4, **kwargs) -> list[LayerResult]:
    """One LayerResult per nn.Linear / nn.Conv2d of ``model``."""
    return [
        rtn_layer(name, m, bits, **kwargs)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]


def make_result(model: nn.Module, layers: list[LayerResult]) -> QuantizationResult:
    n = sum(x.n_weights for x in layers)
    total_bits = 8 * sum(x.bytes for x in layers)
    code_bits = sum(8 * (-(-b.n_weights * b.bits // 8)) for x in layers for b in x.blocks)
    return QuantizationResult(
        model=model,
        layers=layers,
        bits_per_weight=total_bits / n,
        code_bits_per_weight=code_bits / n,
        budget_bits=total_bits,
        info={"structure": "diag", "prior_precision": 1.0, "method": "rtn"},
    )


def dequantized_float_model(model: nn.Module, layers: list[LayerResult]) -> nn.Module:
    """A copy of ``model`` whose float weights are the blocks' dequantized values."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for layer in layers:
            m = out.get_submodule(layer.name)
            w = torch.cat([dequantize(b) for b in layer.blocks]).reshape(layer.weight_shape)
            m.weight.copy_(w)
    return out
