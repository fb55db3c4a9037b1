"""The manifest schema: records that describe packed layers for the artifact, transformers'
``quantization_config`` and the resume state, and the step through which packed layers enter a
model."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import pytest
import torch
from _quant_helpers import make_result, rtn_layer
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bayesq_lightning.artifact import (
    ArtifactError,
    QuantizedLinear,
    load_quantized,
    replace_quantized_layers,
    save_quantized,
)
from bayesq_lightning.artifact import replace as replace_module
from bayesq_lightning.artifact.export import HEADER_KEY, MANIFEST_FILE, TENSORS_FILE
from bayesq_lightning.artifact.manifest import (
    BlockSpec,
    LayerEntry,
    Manifest,
    PackedLayers,
    TiedEntry,
)


class TiedConvs(nn.Module):
    """Two convs sharing one weight with different padding, and a linear head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=2, dilation=2)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.a(x) + self.b(x)).mean(dim=(2, 3)))


def tied_result(model: TiedConvs):
    layers = [rtn_layer("a", model.a, [3, 4], nonuniform=(1,)), rtn_layer("fc", model.fc, 4)]
    return dataclasses.replace(make_result(model, layers), tied={"b": "a"})


@pytest.fixture
def artifact(tmp_path):
    model = TiedConvs()
    result = tied_result(model)
    save_quantized(replace_quantized_layers(model, result.layers, tied=result.tied), result,
                   tmp_path)
    return tmp_path


def test_a_written_manifest_reads_back_to_the_same_bytes(artifact):
    text = (artifact / MANIFEST_FILE).read_text(encoding="utf-8")
    manifest = Manifest.from_json(json.loads(text))
    assert json.dumps(manifest.to_json(), indent=1) == text
    assert [x.name for x in manifest.packed.layers] == ["a", "fc"]
    assert manifest.packed.tied == [TiedEntry("b", "a", True, manifest.packed.tied[0].conv)]
    assert manifest.packed.tied[0].conv["dilation"] == [2, 2]
    alias = manifest.packed.alias_entry(manifest.packed.tied[0])
    assert alias.name == "b" and alias.blocks == manifest.packed.layers[0].blocks
    assert alias.conv != manifest.packed.layers[0].conv


def test_a_layer_entry_is_pinned():
    """The JSON of one block and layer, field by field: the on-disk format."""
    spec = BlockSpec(rows=(0, 2), bits=3, quantizer="uniform", group_size=None, cols=6,
                     meta_shapes={"scale": (2, 1), "zero": (2, 1)})
    entry = LayerEntry("fc", "linear", (2, 6), True, [spec])
    assert entry.to_json() == {
        "name": "fc", "kind": "linear", "weight_shape": [2, 6], "bias": True,
        "code_bytes": 5, "meta_bytes": 8,
        "blocks": [{
            "rows": [0, 2], "bits": 3, "quantizer": "uniform", "group_size": None,
            "shape": [2, 6], "code_bytes": 5, "meta_bytes": 8, "storage_bits": 104,
            "tensors": {"codes": "fc.block0_codes", "scale": "fc.block0_scale",
                        "zero": "fc.block0_zero"},
            "meta_shapes": {"scale": [2, 1], "zero": [2, 1]},
        }],
    }
    assert list(entry.to_json()) == ["name", "kind", "weight_shape", "bias", "code_bytes",
                                     "meta_bytes", "blocks"]
    assert LayerEntry.from_json(entry.to_json()) == entry
    assert entry.tensors() == {"fc.block0_codes": ("codes", (5,)),
                               "fc.block0_scale": ("scale", (2, 1)),
                               "fc.block0_zero": ("zero", (2, 1))}


def test_within_names_layers_relative_to_a_submodule():
    spec = BlockSpec((0, 2), 4, "uniform", None, 6, {"scale": (2, 1), "zero": (2, 1)})
    packed = PackedLayers(
        layers=[LayerEntry("model.fc", "linear", (2, 6), True, [spec]),
                LayerEntry("head", "linear", (2, 6), True, [spec])],
        tied=[TiedEntry("model.tie", "model.fc", False)], bits_per_weight=4.5)
    inner = packed.within("model")
    assert [x.name for x in inner.layers] == ["fc"]
    assert inner.tied == [TiedEntry("tie", "fc", False)] and inner.bits_per_weight == 4.5
    assert packed.within("") == packed
    assert PackedLayers.from_json(packed.to_json()) == packed


def _rewrite_header(directory, edit) -> None:
    path = directory / TENSORS_FILE
    with safe_open(str(path), "pt") as f:
        data = json.loads(f.metadata()[HEADER_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(data)
    save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(data)})
    (directory / MANIFEST_FILE).unlink()


@pytest.mark.parametrize("edit", [
    lambda d: d["tied"][0].update(owner="nowhere"),
    lambda d: d["layers"][0].pop("conv"),
    lambda d: d["layers"][1]["blocks"][0].pop("rows"),
], ids=["unknown-owner", "conv-without-options", "block-without-rows"])
def test_malformed_entries_are_refused_with_the_fix(artifact, edit):
    _rewrite_header(artifact, edit)
    with pytest.raises(ArtifactError, match="manifest .* is malformed.*re-export"):
        load_quantized(TiedConvs(seed=1), artifact)


def test_every_packed_model_is_announced_once_with_its_layers(artifact, monkeypatch):
    seen = []
    monkeypatch.setattr(replace_module, "INSTALL_LISTENERS",
                        [lambda model, packed: seen.append((model, packed))])
    model = TiedConvs()
    result = tied_result(model)
    replace_quantized_layers(model, result.layers, tied=result.tied, bits_per_weight=3.5)
    loaded = load_quantized(TiedConvs(seed=1), artifact)
    assert [m for m, _ in seen] == [model, loaded]
    for _, packed in seen:
        assert [x.name for x in packed.layers] == ["a", "fc"]
        assert [t.name for t in packed.tied] == ["b"]
    assert seen[0][1].bits_per_weight == 3.5
    assert seen[1][1].bits_per_weight == result.bits_per_weight
    assert seen[0][1].to_json()["layers"] == seen[1][1].to_json()["layers"]


def test_the_layers_of_a_model_share_one_decode_buffer(artifact):
    model = load_quantized(TiedConvs(seed=1), artifact)
    assert model.a.decode_buffer is model.b.decode_buffer is model.fc.decode_buffer
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied.a.decode_buffer is copied.fc.decode_buffer
        assert copied.a.decode_buffer is not model.a.decode_buffer
    alone = QuantizedLinear.from_float(model.fc.to_float(), rtn_layer("fc", model.fc.to_float(), 4))
    assert alone.decode_buffer is not model.fc.decode_buffer
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want = model(x)
        model.fc.decode_buffer.release()
        assert torch.equal(model(x), want)
