"""``save_pretrained`` / ``from_pretrained`` of packed transformers models through the "bayesq"
entry of transformers' quantizer registry (tiny random BertConfig models; no files, no network)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bayesq_lightning import BayesQConfig, load_quantized, quantize_model, save_quantized
from bayesq_lightning.artifact import ArtifactError, QuantizedLinear

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForSequenceClassification  # noqa: E402


def tiny_bert(layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


IDS = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


CONFIGS = {
    # mixed widths, groups of 16 and two blocks per layer
    "uniform-groups-mixed": BayesQConfig(method="mse", bits=4.6, group_size=16, block_rows=16),
    # codebooks beside grids, mixed widths
    "nonuniform-auto": BayesQConfig(method="mse", bits=3.0, quantizer="auto"),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    q = quantize_model(tiny_bert(), None, CONFIGS[request.param], progress=False)
    d = tmp_path_factory.mktemp(request.param)
    q.model.save_pretrained(d)
    return q, d


@pytest.fixture(scope="module")
def saved_uniform(tmp_path_factory):
    q = quantize_model(tiny_bert(), None, CONFIGS["uniform-groups-mixed"], progress=False)
    d = tmp_path_factory.mktemp("uniform")
    q.model.save_pretrained(d)
    return q, d


def test_round_trip_is_exact(saved):
    q, d = saved
    widths = {b.bits for x in q.layers for b in x.blocks}
    kinds = {b.quantizer for x in q.layers for b in x.blocks}
    assert len(widths) > 1  # mixed bits in every case
    cfg = json.loads((d / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bayesq" and cfg["format_version"] == 1
    assert [e["name"] for e in cfg["layers"]] == [x.name for x in q.layers]
    loaded = AutoModelForSequenceClassification.from_pretrained(d)
    assert isinstance(loaded.bert.encoder.layer[0].attention.self.query, QuantizedLinear)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(logits(loaded), logits(q.model))  # kernel="exact": the loaders' default
    if "nonuniform" in kinds:
        assert kinds == {"uniform", "nonuniform"}
    loaded.save_pretrained(d / "again")  # a loaded model saves the same way
    again = AutoModelForSequenceClassification.from_pretrained(d / "again")
    assert torch.equal(logits(again), logits(q.model))


def test_from_the_bayesq_artifact_to_save_pretrained(tmp_path):
    q = quantize_model(tiny_bert(), None, CONFIGS["uniform-groups-mixed"], progress=False)
    save_quantized(q.model, q, tmp_path / "artifact")
    skeleton = load_quantized(tiny_bert(seed=5), tmp_path / "artifact")
    skeleton.save_pretrained(tmp_path / "hf")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert torch.equal(logits(loaded), logits(q.model))


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(d: Path, edit) -> None:
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _drop_tensor(d: Path) -> None:
    path = str(d / "model.safetensors")
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith("query.block0_codes")}
        meta = f.metadata()
    save_file(tensors, path, metadata=meta)


def _truncate(d: Path) -> None:
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _future(cfg: dict) -> None:
    cfg["quantization_config"]["format_version"] = 99


def _deeper(cfg: dict) -> None:  # another architecture: a layer the config does not describe
    cfg["quantization_config"]["layers"][0]["weight_shape"] = [48, 32]


CORRUPTIONS = {
    "format-from-the-future": (lambda d: _edit_config(d, _future),
                               r"format_version 99, newer.*upgrade bayesq-lightning"),
    "missing-tensor": (_drop_tensor, r"does not match its bayesq quantization_config: missing "
                                     r"\[.*query\.block0_codes.*re-save"),
    "truncated": (_truncate, r"cannot be read.*corrupt or incomplete; re-save"),
    "wrong-architecture": (lambda d: _edit_config(d, _deeper),
                           r"weight shape \(48, 32\).*\(32, 32\) in the skeleton; build"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_directories_are_refused(saved, corruption, tmp_path):
    _, d = saved
    target = _copy(d, tmp_path / "copy")
    corrupt, match = CORRUPTIONS[corruption]
    corrupt(target)
    with pytest.raises(ArtifactError, match=match):
        AutoModelForSequenceClassification.from_pretrained(target)


def test_dense_weights_under_a_bayesq_config_are_refused(saved_uniform, tmp_path):
    _, d = saved_uniform
    dense = tmp_path / "dense"
    tiny_bert().save_pretrained(dense)
    cfg = json.loads((d / "config.json").read_text())["quantization_config"]
    _edit_config(dense, lambda c: c.update(quantization_config=cfg))
    with pytest.raises(ArtifactError, match="holds dense weights.*do not belong together"):
        AutoModelForSequenceClassification.from_pretrained(dense)


def test_bayesq_cannot_quantize_on_the_fly(tmp_path):
    from bayesq_lightning.hf.quantizer import BayesQHFConfig

    tiny_bert().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForSequenceClassification.from_pretrained(
            tmp_path, quantization_config=BayesQHFConfig())


def test_registration_waits_for_transformers_and_keeps_the_import_light():
    code = (
        "import sys, bayesq_lightning\n"
        "assert 'transformers' not in sys.modules, 'imported transformers'\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M\n"
        "assert 'bayesq' in M, sorted(M)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                         timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_without_the_import_transformers_warns_and_reports_missing_weights(saved_uniform):
    """What a user sees who forgot ``import bayesq_lightning``: a warning naming the unknown
    quantization type and a load report of missing weights (newly initialised layers)."""
    _, d = saved_uniform
    code = (
        "import sys\n"
        "from transformers import AutoModelForSequenceClassification as A\n"
        f"m = A.from_pretrained({str(d)!r})\n"
        "print(type(m.bert.encoder.layer[0].attention.self.query).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False, timeout=120)
    assert out.stdout.strip() == "Linear"
    assert "Unknown quantization type, got bayesq" in out.stderr
    assert "MISSING" in out.stderr and "block0_codes" in out.stderr


class Wrapper(torch.nn.Module):
    """A user's module holding a transformers model (as a LightningModule would)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_bert()

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


def test_nested_transformers_model_saves_with_names_relative_to_it(tmp_path):
    q = quantize_model(Wrapper(), None, CONFIGS["uniform-groups-mixed"], progress=False)
    inner = q.model.model
    names = [e["name"] for e in inner.config.quantization_config.layers]
    assert names and not any(n.startswith("model.") for n in names)
    inner.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert torch.equal(logits(loaded), logits(inner))
