"""The student's logit temperature: the label-free fit, the hook, and its round trips through
the artifact, transformers' ``save_pretrained`` / ``from_pretrained`` and a corrupt manifest."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TinyNet, make_data
from torch import nn
from torch.utils.data import DataLoader

from bayesq_lightning import BayesQConfig, load_quantized, quantize_model, save_quantized
from bayesq_lightning.artifact import ArtifactError
from bayesq_lightning.artifact.temperature import logit_temperature, set_logit_temperature
from bayesq_lightning.distillation.temperature import BOUNDS, fit_temperature


@pytest.mark.parametrize("tau", [0.3, 1.0, 2.5, 7.0])
def test_the_fit_recovers_a_known_temperature(tau):
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(500, 10, generator=g)
    teacher = (z / tau).log_softmax(-1)
    assert fit_temperature(z, teacher) == pytest.approx(tau, rel=1e-6)
    # with a teacher no temperature reproduces, the fit is the minimum of the mean KL
    noisy = (teacher + 0.3 * torch.randn(500, 10, generator=g)).log_softmax(-1)

    def kl(t: float) -> float:
        return float((noisy.exp() * (noisy - (z / t).log_softmax(-1))).sum(-1).mean())

    best = fit_temperature(z, noisy)
    assert all(kl(best) < kl(best * f) for f in (0.95, 1.05))


def test_the_fit_on_degenerate_logits_and_at_the_bounds():
    flat = torch.zeros(4, 3)
    assert fit_temperature(flat, torch.randn(4, 3)) == 1.0  # every temperature fits
    z = torch.tensor([[1.0, -1.0]] * 4)
    assert fit_temperature(z, (z * 1e4).log_softmax(-1)) == BOUNDS[0]  # sharper than allowed
    assert fit_temperature(z, torch.zeros(4, 2)) == BOUNDS[1]  # uniform: infinitely hot
    with pytest.raises(ValueError, match="same"):
        fit_temperature(z, torch.zeros(4, 3))


class Wrapped(nn.Module):
    """A transformers-style output: an object with ``.logits``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()

    def forward(self, x):
        return type("Out", (), {"logits": self.net(x)})()


def test_the_hook_divides_tensors_and_dot_logits_and_replaces_itself():
    torch.manual_seed(0)
    net, x = TinyNet().eval(), torch.randn(5, 1, 8, 8)
    raw = net(x)
    set_logit_temperature(net, 2.0)
    set_logit_temperature(net, 4.0)  # replaces, never stacks
    assert logit_temperature(net) == 4.0 and torch.equal(net(x), raw / 4.0)
    set_logit_temperature(net, None)
    assert logit_temperature(net) is None and torch.equal(net(x), raw)
    w = Wrapped().eval()
    set_logit_temperature(w, 2.0)
    assert torch.equal(w(x).logits, w.net(x) / 2.0)
    with pytest.raises(ValueError, match="positive finite"):
        set_logit_temperature(net, float("nan"))
    tupled = nn.Sequential(nn.Identity())
    tupled.forward = lambda x: (x, x)  # type: ignore[method-assign]
    set_logit_temperature(tupled, 2.0)
    with pytest.raises(TypeError, match="not logits"):
        tupled(x)


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    calib = DataLoader(make_data(64, seed=2), batch_size=32)
    return quantize_model(TinyNet(), calib, BayesQConfig(bits=3.0, calib_batches=2),
                          n_data=64, progress=False)


def test_the_artifact_stores_and_every_load_applies_it(quantized, tmp_path):
    x = torch.randn(7, 1, 8, 8)
    set_logit_temperature(quantized.model, 1.7)
    try:
        with torch.no_grad():
            want = quantized.model.eval()(x)
        save_quantized(quantized.model, quantized, tmp_path / "a")
    finally:
        set_logit_temperature(quantized.model, None)
    manifest = json.loads((tmp_path / "a" / "bayesq.json").read_text())
    assert manifest["logit_temperature"] == 1.7
    loaded = load_quantized(TinyNet(), tmp_path / "a")
    assert logit_temperature(loaded) == 1.7
    with torch.no_grad():
        assert torch.equal(loaded(x), want)  # bit-identical logits


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), "2", True])
def test_a_bad_stored_temperature_is_refused_naming_the_field(quantized, tmp_path, bad):
    from safetensors import safe_open
    from safetensors.torch import save_file

    set_logit_temperature(quantized.model, 1.7)
    try:
        save_quantized(quantized.model, quantized, tmp_path / "a")
    finally:
        set_logit_temperature(quantized.model, None)
    path = tmp_path / "a" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["bayesq"])
    meta["logit_temperature"] = bad
    text = json.dumps(meta, indent=1)
    save_file(tensors, str(path), metadata={"bayesq": text})
    (tmp_path / "a" / "bayesq.json").write_text(text)
    skeleton = TinyNet()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(ArtifactError, match="logit_temperature"):
        load_quantized(skeleton, tmp_path / "a")
    assert logit_temperature(skeleton) is None
    for k, v in skeleton.state_dict().items():
        assert torch.equal(v, before[k])


def test_save_pretrained_and_from_pretrained_keep_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_hf_pretrained import logits, tiny_bert

    q = quantize_model(tiny_bert(layers=1), None, BayesQConfig(method="mse", bits=4.0),
                       progress=False)
    set_logit_temperature(q.model, 0.8)
    q.model.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert cfg["logit_temperature"] == 0.8
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert logit_temperature(loaded) == 0.8
    assert torch.equal(logits(loaded), logits(q.model))
    set_logit_temperature(q.model, None)
    assert torch.equal(logits(loaded), logits(q.model) / 0.8)
    cfg["logit_temperature"] = -1
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["quantization_config"] = cfg
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="logit_temperature"):
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
