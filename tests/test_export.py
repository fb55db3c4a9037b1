"""Tests of the safetensors + JSON artifact."""

from __future__ import annotations

import copy
import json
import os
import re
import warnings

import pytest
import torch
from _quant_helpers import dequantized_float_model, make_result, rtn_layer, rtn_layers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from bayesq_lightning.artifact import (
    ArtifactError,
    QuantizedConv2d,
    QuantizedLinear,
    export,
    load_quantized,
    replace_quantized_layers,
    save_quantized,
)
from bayesq_lightning.artifact.export import tensors_digest
from bayesq_lightning.quantizers import block_storage_bits


class SmallCNN(nn.Module):
    def __init__(self, width: int = 8, fc: bool = True, extra: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=4, bias=False)
        self.conv3 = nn.Conv2d(width, width, 3, stride=2, padding=1, groups=width)  # depthwise
        self.fc = nn.Linear(width, 5) if fc else nn.Identity()
        if extra:
            self.register_buffer("extra", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv3(torch.relu(self.conv2(x))))
        return self.fc(x.mean(dim=(2, 3)))


class Tied(nn.Module):
    """An embedding tied to an output head (not quantized) around one quantized layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.emb(ids))))


def cnn(seed: int = 0, **kwargs) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(**kwargs)
    model(torch.randn(4, 3, 8, 8))  # move BatchNorm statistics off their defaults
    return model.eval()


def cnn_result(model: nn.Module, bits=(3, 4)):
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            layers.append(rtn_layer(name, m, list(bits)[: m.weight.shape[0]], nonuniform=(1,)))
    return make_result(model, layers)


def quantized(model: nn.Module, result) -> nn.Module:
    return replace_quantized_layers(copy.deepcopy(model), result.layers)


def snapshot(model: nn.Module):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def assert_unchanged(model: nn.Module, snap) -> None:
    types, state = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())


X = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def test_cnn_round_trip(tmp_path):
    model = cnn()
    result = cnn_result(model)
    q = quantized(model, result)
    save_quantized(q, result, tmp_path)
    skeleton = cnn(seed=1)
    loaded = load_quantized(skeleton.train(), tmp_path)
    assert loaded is skeleton
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert isinstance(loaded.conv2, QuantizedConv2d) and isinstance(loaded.fc, QuantizedLinear)
    with torch.no_grad():
        assert torch.equal(loaded(X), q(X))
        assert not torch.equal(loaded(X), model(X))
    assert torch.equal(loaded.bn1.running_var, model.bn1.running_var)

    manifest = json.loads((tmp_path / "bayesq.json").read_text())
    assert manifest["schema_version"] == 2
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:  # the file describes itself
        assert json.loads(f.metadata()["bayesq"]) == manifest
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert manifest["tensors_sha256"] == tensors_digest(stored)
    assert manifest["budget_bits"] == result.budget_bits
    assert manifest["bits_per_weight"] == result.bits_per_weight
    assert manifest["code_bits_per_weight"] == result.code_bits_per_weight
    assert manifest["posterior"] == {"structure": "diag", "prior_precision": 1.0}
    assert set(manifest["versions"]) >= {"torch", "laplace-torch", "bayesq-lightning"}
    assert manifest["versions"]["torch"] == torch.__version__
    conv2 = next(x for x in manifest["layers"] if x["name"] == "conv2")
    assert conv2["conv"]["groups"] == 4 and conv2["weight_shape"] == [8, 2, 3, 3]
    assert [b["bits"] for b in conv2["blocks"]] == [3, 4]
    assert [b["quantizer"] for b in conv2["blocks"]] == ["uniform", "nonuniform"]
    assert [b["rows"] for b in conv2["blocks"]] == [[0, 4], [4, 8]]
    assert conv2["blocks"][0]["shape"] == [4, 18]


def test_save_from_float_model_packs_a_copy(tmp_path):
    model = cnn()
    result = cnn_result(model)
    float_model = dequantized_float_model(model, result.layers)  # what result.model holds
    snap = snapshot(float_model)
    save_quantized(float_model, result, tmp_path)
    assert_unchanged(float_model, snap)
    loaded = load_quantized(cnn(seed=2), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(X), quantized(model, result)(X))
        assert torch.equal(loaded(X), float_model(X))


def test_byte_accounting(tmp_path):
    model = cnn()
    result = cnn_result(model, bits=(2, 3))
    save_quantized(quantized(model, result), result, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    names = [x.name for x in result.layers]
    pattern = re.compile(rf"^({'|'.join(map(re.escape, names))})\.block\d+_")
    packed = sum(t.numel() * t.element_size() for k, t in tensors.items() if pattern.match(k))
    expect = sum(block_storage_bits(b) for x in result.layers for b in x.blocks)
    assert 8 * packed == expect == 8 * result.total_bytes
    manifest = json.loads((tmp_path / "bayesq.json").read_text())
    assert 8 * sum(x["code_bytes"] + x["meta_bytes"] for x in manifest["layers"]) == expect
    # No float weight of a quantized layer is stored.
    assert not any(f"{n}.weight" in tensors for n in names)


def tiny_bert(seed: int):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).eval()


def test_tiny_bert_round_trip(tmp_path):
    model = tiny_bert(0)
    result = make_result(model, rtn_layers(model, [3, 4]))
    assert len(result.layers) == 2 * 6 + 2  # per layer q, k, v, o, up, down; pooler; classifier
    q = quantized(model, result)
    save_quantized(q, result, tmp_path)
    loaded = load_quantized(tiny_bert(1), tmp_path)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        a = loaded(input_ids=ids, attention_mask=mask).logits
        b = q(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)


def test_tied_weights_stored_once(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    result = make_result(model, [rtn_layer("fc", model.fc, 4)])
    q = quantized(model, result)
    save_quantized(q, result, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    manifest = json.loads((tmp_path / "bayesq.json").read_text())
    assert ("emb.weight" in tensors) != ("head.weight" in tensors)
    assert manifest["aliases"] in ({"head.weight": "emb.weight"}, {"emb.weight": "head.weight"})
    torch.manual_seed(1)
    loaded = load_quantized(Tied(), tmp_path)
    assert loaded.head.weight is loaded.emb.weight
    ids = torch.randint(0, 20, (4, 3))
    with torch.no_grad():
        assert torch.equal(loaded(ids), q(ids))


def test_views_of_one_storage_are_stored_separately(tmp_path):
    # Overlapping, different views of one storage cannot be aliases (and safetensors refuses
    # them); each is stored as its own tensor.
    torch.manual_seed(0)
    model = SmallCNN()
    base = torch.randn(4)
    model.register_buffer("a", base[0:3])
    model.register_buffer("b", base[1:4])
    result = cnn_result(model)
    save_quantized(quantized(model, result), result, tmp_path)
    torch.manual_seed(1)
    skeleton = SmallCNN()
    skeleton.register_buffer("a", torch.zeros(3))
    skeleton.register_buffer("b", torch.zeros(3))
    load_quantized(skeleton, tmp_path)
    assert torch.equal(skeleton.a, base[0:3]) and torch.equal(skeleton.b, base[1:4])


# --- interrupted saves -------------------------------------------------------------------------


def fail_before_tensors(monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed before the safetensors write")

    monkeypatch.setattr(export, "save_file", boom)


def _fail_at_rename(monkeypatch, target: str, after: bool = False):
    real = os.replace

    def replace(src, dst):
        if after:
            real(src, dst)
        if str(dst).endswith(target):
            raise KeyboardInterrupt(f"killed {'after' if after else 'at'} the rename to {target}")
        if not after:
            real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def fail_at_commit(monkeypatch):  # the tensor file's rename: nothing changed yet
    _fail_at_rename(monkeypatch, "model.safetensors")


def fail_at_manifest_copy(monkeypatch):  # committed; bayesq.json still the previous copy
    _fail_at_rename(monkeypatch, "bayesq.json")


def fail_after_all(monkeypatch):
    _fail_at_rename(monkeypatch, "bayesq.json", after=True)


@pytest.mark.parametrize("with_previous", [True, False], ids=["over-previous", "fresh"])
@pytest.mark.parametrize(
    "point", [fail_before_tensors, fail_at_commit, fail_at_manifest_copy, fail_after_all])
def test_interrupted_save(tmp_path, monkeypatch, point, with_previous):
    """A save interrupted anywhere leaves a loadable artifact: the previous one until the tensor
    file is renamed, the new one after; with no previous artifact, loading is refused until
    then."""
    model = cnn()
    old_result, new_result = cnn_result(model, (4, 8)), cnn_result(model, (2, 3))
    old, new = quantized(model, old_result), quantized(model, new_result)
    with torch.no_grad():
        want_old, want_new = old(X), new(X)
    assert not torch.equal(want_old, want_new)
    if with_previous:
        save_quantized(old, old_result, tmp_path)
    point(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(new, new_result, tmp_path, overwrite=with_previous)
    monkeypatch.undo()

    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    skeleton = cnn(seed=3)
    committed = point in (fail_at_manifest_copy, fail_after_all)
    if committed or with_previous:
        # only a commit over a previous copy leaves bayesq.json behind the tensor file
        stale = point is fail_at_manifest_copy and with_previous
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load_quantized(skeleton, tmp_path)
        assert any("does not match the manifest" in str(w.message) for w in caught) == stale
        with torch.no_grad():
            assert torch.equal(loaded(X), want_new if committed else want_old)
    else:
        snap = snapshot(skeleton)
        with pytest.raises(FileNotFoundError, match="save_quantized"):
            load_quantized(skeleton, tmp_path)
        assert_unchanged(skeleton, snap)


# --- refused artifacts -------------------------------------------------------------------------


@pytest.fixture
def artifact(tmp_path):
    model = cnn()
    result = cnn_result(model)
    save_quantized(quantized(model, result), result, tmp_path)
    return tmp_path


def check_refused(directory, error, match, skeleton=None):
    skeleton = skeleton if skeleton is not None else cnn(seed=4)
    snap = snapshot(skeleton)
    with pytest.raises(error, match=match):
        load_quantized(skeleton, directory)
    assert_unchanged(skeleton, snap)


def test_missing_files(artifact):
    (artifact / "model.safetensors").unlink()
    check_refused(artifact, FileNotFoundError, r"model\.safetensors.*re-export")
    (artifact / "bayesq.json").unlink()
    check_refused(artifact, FileNotFoundError, r"bayesq\.json.*save_quantized")


def test_manifest_copy_is_optional(artifact):
    (artifact / "bayesq.json").unlink()  # the tensor file carries its own manifest
    with torch.no_grad():
        assert load_quantized(cnn(seed=4), artifact)(X).isfinite().all()


def test_sha256_mismatch(artifact):
    path = artifact / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a flipped bit in the tensor data
    path.write_bytes(bytes(data))
    check_refused(artifact, ArtifactError, "artifact is corrupt or was interrupted; re-export")


def _rewrite_header(directory, edit) -> None:
    """Rewrite model.safetensors with its header manifest text passed through ``edit``."""
    path = directory / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        text = f.metadata()["bayesq"]
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={"bayesq": edit(text)})
    (directory / "bayesq.json").unlink()


def test_schema_from_the_future(artifact):
    _rewrite_header(artifact, lambda t: json.dumps({**json.loads(t), "schema_version": 999}))
    check_refused(artifact, ArtifactError, r"schema version 999.*reads version 2.*re-export")


def test_malformed_manifest(artifact):
    _rewrite_header(artifact, lambda t: "{not json")
    check_refused(artifact, ArtifactError, "not valid JSON.*re-export")


def test_foreign_safetensors_file(artifact):
    path = artifact / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path))  # e.g. a plain state dict saved under the artifact's name
    check_refused(artifact, ArtifactError, "no bayesq manifest.*re-export")


@pytest.mark.parametrize("cut", [0.5, 0.999], ids=["half", "last-byte"])
def test_truncated_tensor_file(artifact, cut):
    path = artifact / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    check_refused(artifact, ArtifactError, "corrupt or was interrupted; re-export")


def test_stale_manifest_copy_warns_and_loads_the_tensor_file(artifact):
    (artifact / "bayesq.json").write_text("{not json")
    with pytest.warns(UserWarning, match="does not match the manifest inside"):
        loaded = load_quantized(cnn(seed=4), artifact)
    with torch.no_grad():
        assert loaded(X).isfinite().all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 12}, r"layer 'conv1' has weight shape \(8, 3, 3, 3\).*\(12, 3, 3, 3\)"),
        ({"fc": False}, r"layer 'fc' is linear .* but Identity in the skeleton"),
        # Fails only at the tensor load, after the packed modules were built.
        ({"extra": True}, r"missing \['extra'\]"),
    ],
    ids=["wrong-shape", "missing-layer", "extra-tensor"],
)
def test_mismatched_skeleton(artifact, kwargs, match):
    check_refused(artifact, ArtifactError, match, skeleton=cnn(seed=4, **kwargs))


def test_conv_options_mismatch(artifact):
    skeleton = cnn(seed=4)
    skeleton.conv3.stride = (1, 1)
    check_refused(artifact, ArtifactError, "conv layer 'conv3' has options", skeleton=skeleton)


def test_save_rejects_result_of_another_model(tmp_path):
    model = cnn()
    result = cnn_result(model)
    q = quantized(model, cnn_result(model, (2, 2)))
    with pytest.raises(ValueError, match="does not match its LayerResult"):
        save_quantized(q, result, tmp_path)
    assert not list(tmp_path.iterdir())


def test_load_refuses_an_unknown_kernel_before_reading(tmp_path):
    skeleton = cnn(seed=1)
    with pytest.raises(ValueError, match="kernel='fast' is not one of"):
        load_quantized(skeleton, tmp_path, kernel="fast")  # no artifact there: checked first
