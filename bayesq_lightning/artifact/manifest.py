"""The manifest schema: plain records of what a packed model holds, with ``to_json`` / ``from_json``.

One schema serves every description of packed layers:

* the artifact's manifest (:class:`Manifest`, in the safetensors header and ``bayesq.json``);
* transformers' ``quantization_config`` (:class:`PackedLayers`, see :mod:`bayesq_lightning.hf`);
* the block layout of the callback's resume state (:meth:`BlockSpec.layout_json`, see
  :mod:`bayesq_lightning.state`).

``to_json`` returns plain JSON data (dicts, lists, numbers, strings) in a fixed key order, so the
text ``json.dumps`` writes is the same for the same model. ``from_json`` reads only the fields it
needs and derives the rest (sizes, tensor names); a missing or ill-typed field raises
``KeyError`` / ``TypeError`` / ``IndexError``, which the readers turn into an
:class:`ArtifactError` that names the fix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..quantizers import storage_bits
from ..result import BlockResult
from .packing import packed_nbytes
from .temperature import check_temperature

SCHEMA_VERSION = 2  # of the artifact manifest; the tensors live in model.safetensors
TENSORS_FILE = "model.safetensors"
META_NAMES = {"uniform": ("scale", "zero"), "nonuniform": ("codebook",)}


class ArtifactError(ValueError):
    """An artifact that cannot be loaded: corrupt, of another schema, or for another model."""


@dataclass
class BlockSpec:
    """Layout of one packed block: everything except the tensor values.

    Attributes
    ----------
    rows : tuple[int, int]
        ``(start, stop)`` output-channel range.
    bits : int
        Bits per code.
    quantizer : str
        ``"uniform"`` or ``"nonuniform"``.
    group_size : int or None
        Input columns per scale/zero; ``None`` for one per row.
    cols : int
        Codes per row, ``prod(weight_shape[1:])``.
    meta_shapes : dict[str, tuple[int, ...]]
        Shape of each fp16 metadata tensor: ``scale`` and ``zero``, or ``codebook``.
    """

    rows: tuple[int, int]
    bits: int
    quantizer: str
    group_size: int | None
    cols: int
    meta_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return self.rows[1] - self.rows[0]

    @property
    def n_weights(self) -> int:
        return self.n_rows * self.cols

    @property
    def code_bytes(self) -> int:
        return packed_nbytes(self.n_weights, self.bits)

    @property
    def meta_bytes(self) -> int:
        return 2 * sum(math.prod(s) for s in self.meta_shapes.values())

    def tensor_names(self, prefix: str) -> dict[str, str]:
        """``{role: state-dict key}`` of the block's tensors; ``prefix`` is ``<layer>.block<i>_``."""
        return {"codes": f"{prefix}codes", **{m: f"{prefix}{m}" for m in self.meta_shapes}}

    def tensor_shape(self, role: str) -> tuple[int, ...]:
        """Stored shape of the tensor ``role``: packed ``uint8`` codes, or fp16 metadata."""
        return (self.code_bytes,) if role == "codes" else tuple(self.meta_shapes[role])

    def layout_json(self) -> dict[str, Any]:
        """Rows, bits, quantizer, group size and the codes' ``[rows, cols]`` shape."""
        return {"rows": list(self.rows), "bits": self.bits, "quantizer": self.quantizer,
                "group_size": self.group_size, "shape": [self.n_rows, self.cols]}

    def to_json(self, prefix: str) -> dict[str, Any]:
        """The manifest entry: the layout, sizes, storage bits, tensor names and metadata shapes."""
        n_meta = sum(math.prod(shape) for shape in self.meta_shapes.values())
        return {
            **self.layout_json(),
            "code_bytes": self.code_bytes,
            "meta_bytes": self.meta_bytes,
            "storage_bits": storage_bits(self.n_weights, self.bits, n_meta),
            "tensors": self.tensor_names(prefix),
            "meta_shapes": {m: list(shape) for m, shape in self.meta_shapes.items()},
        }

    @classmethod
    def from_json(cls, entry: Mapping[str, Any],
                  meta_shapes: Mapping[str, tuple[int, ...]] | None = None) -> BlockSpec:
        """The spec of a manifest entry (:meth:`to_json`), or of a layout (:meth:`layout_json`)
        whose ``meta_shapes`` are given."""
        if meta_shapes is None:
            meta_shapes = {m: tuple(s) for m, s in entry["meta_shapes"].items()}
        return cls(rows=tuple(entry["rows"]), bits=entry["bits"], quantizer=entry["quantizer"],
                   group_size=entry["group_size"], cols=entry["shape"][1],
                   meta_shapes=dict(meta_shapes))


def block_spec(block: BlockResult) -> BlockSpec:
    """The :class:`BlockSpec` of a :class:`~bayesq_lightning.result.BlockResult`."""
    if block.quantizer not in META_NAMES:
        raise ValueError(
            f"unknown quantizer {block.quantizer!r}; expected 'uniform' or 'nonuniform'"
        )
    meta = {}
    for name in META_NAMES[block.quantizer]:
        t = getattr(block, name)
        if t is None:
            raise ValueError(f"a {block.quantizer} block needs {name}, but it is None")
        meta[name] = tuple(t.shape)
    if block.codes.dim() != 2:
        raise ValueError(f"block codes must be (rows, cols), got shape {tuple(block.codes.shape)}")
    return BlockSpec(
        rows=(int(block.rows[0]), int(block.rows[1])),
        bits=int(block.bits),
        quantizer=block.quantizer,
        group_size=block.group_size,
        cols=int(block.codes.shape[1]),
        meta_shapes=meta,
    )


def conv_options(module: nn.Module) -> dict[str, Any]:
    """The ``stride/padding/dilation/groups/padding_mode`` of a (packed) conv, as plain data."""
    padding = module.padding
    return {
        "stride": list(module.stride),
        "padding": padding if isinstance(padding, str) else list(padding),
        "dilation": list(module.dilation),
        "groups": int(module.groups),
        "padding_mode": module.padding_mode,
    }


@dataclass
class LayerEntry:
    """One packed layer: kind, weight shape, bias, conv options and its blocks.

    Attributes
    ----------
    name : str
        Dotted module name in the model.
    kind : str
        ``"linear"`` or ``"conv2d"``.
    weight_shape : tuple[int, ...]
        Shape of the float weight.
    bias : bool
        Whether the layer has a bias (stored as a float tensor beside the blocks).
    blocks : list[BlockSpec]
        Blocks tiling the output channels in order.
    conv : dict or None
        :func:`conv_options` of a conv layer; ``None`` for a linear one.
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    bias: bool
    blocks: list[BlockSpec]
    conv: dict[str, Any] | None = None

    @classmethod
    def of_module(cls, name: str, module: nn.Module) -> LayerEntry:
        """The entry of a packed module (``QuantizedLinear`` / ``QuantizedConv2d``)."""
        return cls(name=name, kind=module.kind, weight_shape=tuple(module.weight_shape),
                   bias=module.bias is not None, blocks=list(module.specs),
                   conv=conv_options(module) if module.kind == "conv2d" else None)

    def to_json(self) -> dict[str, Any]:
        blocks = [s.to_json(f"{self.name}.block{i}_") for i, s in enumerate(self.blocks)]
        entry = {
            "name": self.name,
            "kind": self.kind,
            "weight_shape": list(self.weight_shape),
            "bias": self.bias,
            "code_bytes": sum(b["code_bytes"] for b in blocks),
            "meta_bytes": sum(b["meta_bytes"] for b in blocks),
            "blocks": blocks,
        }
        if self.conv is not None:
            entry["conv"] = self.conv
        return entry

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> LayerEntry:
        return cls(name=entry["name"], kind=entry["kind"],
                   weight_shape=tuple(entry["weight_shape"]), bias=entry["bias"],
                   blocks=[BlockSpec.from_json(b) for b in entry["blocks"]],
                   conv=entry.get("conv"))

    def tensors(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """``{state-dict key: (role, stored shape)}`` of every block tensor."""
        out = {}
        for i, s in enumerate(self.blocks):
            for role, key in s.tensor_names(f"{self.name}.block{i}_").items():
                out[key] = (role, s.tensor_shape(role))
        return out


@dataclass
class TiedEntry:
    """A packed layer that decodes its owner's codes, with its own bias and conv options."""

    name: str
    owner: str
    bias: bool
    conv: dict[str, Any] | None = None

    @classmethod
    def of_module(cls, name: str, owner: str, module: nn.Module) -> TiedEntry:
        return cls(name=name, owner=owner, bias=module.bias is not None,
                   conv=conv_options(module) if module.kind == "conv2d" else None)

    def to_json(self) -> dict[str, Any]:
        entry = {"name": self.name, "owner": self.owner, "bias": self.bias}
        if self.conv is not None:
            entry["conv"] = self.conv
        return entry

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> TiedEntry:
        return cls(name=entry["name"], owner=entry["owner"], bias=entry["bias"],
                   conv=entry.get("conv"))


@dataclass
class PackedLayers:
    """The packed layers of a model: what transformers' ``quantization_config`` carries and the
    layer part of the artifact's :class:`Manifest`.

    Attributes
    ----------
    layers : list[LayerEntry]
        Layers holding their own codes, in the result's order.
    tied : list[TiedEntry]
        Layers decoding another layer's codes.
    bits_per_weight : float or None
        Storage bits per weight of the allocation (codes and metadata).
    logit_temperature : float or None
        The distilled student's logit temperature (:mod:`.temperature`); ``None``: none.
        Written only when set; read back as a positive finite number or refused.
    """

    layers: list[LayerEntry] = field(default_factory=list)
    tied: list[TiedEntry] = field(default_factory=list)
    bits_per_weight: float | None = None
    logit_temperature: float | None = None

    @classmethod
    def describe(cls, modules: Mapping[str, nn.Module], owners: Sequence[str],
                 tied: Mapping[str, str] | None = None,
                 bits_per_weight: float | None = None,
                 logit_temperature: float | None = None) -> PackedLayers:
        """The record of packed ``modules`` (by name): ``owners`` hold codes, ``tied`` maps
        each alias to its owner."""
        return cls(layers=[LayerEntry.of_module(n, modules[n]) for n in owners],
                   tied=[TiedEntry.of_module(a, o, modules[a]) for a, o in (tied or {}).items()],
                   bits_per_weight=bits_per_weight, logit_temperature=logit_temperature)

    def to_json(self) -> dict[str, Any]:
        out = {"bits_per_weight": self.bits_per_weight,
               "layers": [x.to_json() for x in self.layers],
               "tied": [t.to_json() for t in self.tied]}
        if self.logit_temperature is not None:
            out["logit_temperature"] = self.logit_temperature
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PackedLayers:
        """From :meth:`to_json` data or a whole manifest (other keys are ignored)."""
        temp = data.get("logit_temperature")
        if temp is not None:
            try:
                temp = check_temperature(temp)
            except ValueError as e:
                raise ArtifactError(f"the manifest's {e}: the artifact is corrupt or was edited;"
                                    " re-export the model (or remove the field to load it "
                                    "without a temperature)") from None
        return cls(layers=[LayerEntry.from_json(e) for e in data["layers"]],
                   tied=[TiedEntry.from_json(t) for t in data.get("tied") or []],
                   bits_per_weight=data.get("bits_per_weight"), logit_temperature=temp)

    def alias_entry(self, tie: TiedEntry) -> LayerEntry:
        """The layer ``tie`` describes: its owner's blocks with its own name, bias and conv."""
        owner = next((x for x in self.layers if x.name == tie.owner), None)
        if owner is None:
            raise KeyError(tie.owner)
        return dataclasses.replace(owner, name=tie.name, bias=tie.bias,
                                   conv=owner.conv if tie.conv is None else tie.conv)

    def within(self, prefix: str) -> PackedLayers:
        """The layers under submodule ``prefix``, named relative to it (``""``: all)."""
        lead = prefix + "." if prefix else ""
        return PackedLayers(
            layers=[dataclasses.replace(x, name=x.name.removeprefix(lead))
                    for x in self.layers if x.name.startswith(lead)],
            tied=[TiedEntry(t.name.removeprefix(lead), t.owner.removeprefix(lead), t.bias, t.conv)
                  for t in self.tied if t.name.startswith(lead)],
            bits_per_weight=self.bits_per_weight, logit_temperature=self.logit_temperature)

    @property
    def n_weights(self) -> int:
        return sum(math.prod(x.weight_shape) for x in self.layers)


@dataclass
class Manifest:
    """The artifact's manifest: its packed layers, the stored tensors and how they were made.

    Attributes
    ----------
    packed : PackedLayers
        Layers, tied layers and bits per weight.
    tensors_sha256 : str
        Digest of the stored tensors (``export.tensors_digest``).
    aliases : dict[str, str]
        ``{name: stored name}`` of state-dict entries stored once under another name.
    budget_bits, n_weights, code_bits_per_weight
        The allocation's budget, the packed weights and the code bits per weight.
    posterior : dict
        ``structure`` and ``prior_precision`` of the posterior the allocation used.
    method : Any
        The quantization method.
    versions : dict
        Versions of torch and the packages that wrote the artifact.
    schema_version : int
        :data:`SCHEMA_VERSION` when written by this package.
    tensors_file : str
        :data:`TENSORS_FILE`.
    """

    packed: PackedLayers
    tensors_sha256: str
    aliases: dict[str, str]
    budget_bits: int | None = None
    n_weights: int | None = None
    code_bits_per_weight: float | None = None
    posterior: dict[str, Any] = field(default_factory=dict)
    method: Any = None
    versions: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    tensors_file: str = TENSORS_FILE

    def to_json(self) -> dict[str, Any]:
        packed = self.packed.to_json()
        return {
            "schema_version": self.schema_version,
            "tensors_file": self.tensors_file,
            "tensors_sha256": self.tensors_sha256,
            "aliases": self.aliases,
            "layers": packed["layers"],
            "tied": packed["tied"],
            "budget_bits": self.budget_bits,
            "n_weights": self.n_weights,
            "bits_per_weight": packed["bits_per_weight"],
            **({"logit_temperature": self.packed.logit_temperature}
               if self.packed.logit_temperature is not None else {}),
            "code_bits_per_weight": self.code_bits_per_weight,
            "posterior": self.posterior,
            "method": self.method,
            "versions": self.versions,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        return cls(
            packed=PackedLayers.from_json(data), tensors_sha256=data["tensors_sha256"],
            aliases=dict(data["aliases"]), budget_bits=data.get("budget_bits"),
            n_weights=data.get("n_weights"),
            code_bits_per_weight=data.get("code_bits_per_weight"),
            posterior=data.get("posterior") or {}, method=data.get("method"),
            versions=data.get("versions") or {},
            schema_version=data.get("schema_version", SCHEMA_VERSION),
            tensors_file=data.get("tensors_file", TENSORS_FILE),
        )


def jsonable(value: Any) -> Any:
    """Plain JSON data for info values (tensors and numpy values become numbers or lists)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return str(value)
