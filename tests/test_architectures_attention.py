"""Attention modules, transformers' Conv1D and layers used functionally, through the pipeline."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from bayesq_lightning import BayesQConfig, load_quantized, quantize_model, save_quantized
from bayesq_lightning.artifact import QuantizedLinear
from bayesq_lightning.artifact.replace import set_submodule
from bayesq_lightning.artifact.storage import PackedLayer
from bayesq_lightning.attention import LinearMultiheadAttention, linear_equivalent

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


class AttentionNet(nn.Module):
    """Tokens -> one ``nn.MultiheadAttention`` (batch_first; ``kdim`` for cross-attention) -> head."""

    def __init__(self, kdim: int | None = None) -> None:
        super().__init__()
        self.q_in, self.kv_in = nn.Linear(8, 16), nn.Linear(8, kdim or 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.kv_in(x)
        return self.head(self.attn(self.q_in(x), kv, kv, need_weights=False)[0].mean(1))


class EncoderNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.inp(x)).mean(1))


class Conv1DNet(nn.Module):
    """A GPT-2 MLP block of transformers ``Conv1D`` layers (weights stored ``(in, out)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.c_fc, self.c_proj = Conv1D(32, 16), Conv1D(16, 32)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.head((h + self.c_proj(torch.relu(self.c_fc(h)))).mean(1))


MODELS = {"mha": (AttentionNet, "attn.in_proj"), "mha_kdim": (lambda: AttentionNet(12), "attn"),
          "encoder": (EncoderNet, "self_attn"), "conv1d": (Conv1DNet, "c_fc")}
METHODS = {"gptq": {"method": "gptq"}, "diag": {"structure": "diag"},
           "kron": {"structure": "kron"}}
X = torch.randn(32, 6, 8, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1))
LOADER = [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 32, 16)]


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[kind][0]().eval()


def _dequantized(model: nn.Module) -> nn.Module:
    """``model`` with every packed layer replaced by the float layer of its decoded weight."""
    dense = copy.deepcopy(model)
    for name, m in list(dense.named_modules()):
        if isinstance(m, PackedLayer):
            set_submodule(dense, name, m.to_float())
    return dense


def _layer_errors(model: nn.Module, packed: nn.Module, names: list[str]) -> float:
    """``sum ||(W_q - W) x||^2`` over the layers ``names`` and their inputs ``x`` in ``model``."""
    work = linear_equivalent(model)
    inputs: dict[str, list] = {n: [] for n in names}
    hooks = [work.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: inputs[n].append(args[0])) for n in names]
    with torch.no_grad():
        work(X)
    for h in hooks:
        h.remove()
    total = 0.0
    for n in names:
        dw = packed.get_submodule(n).dequantize() - work.get_submodule(n).weight
        total += sum(float((x @ dw.T).pow(2).sum()) for x in inputs[n])
    return total


def _error(model: nn.Module, ref: nn.Module) -> float:
    with torch.no_grad():
        return float((model(X) - ref(X)).pow(2).mean())


@pytest.mark.parametrize("kind,method", itertools.product(MODELS, METHODS))
def test_layer_kind_is_quantized_and_beats_rtn(kind, method):
    model = _model(kind)
    cfg = {"bits": 8.0, "allowed_bits": (2,), "calib_batches": 2}
    result = quantize_model(model, LOADER, BayesQConfig(**cfg, **METHODS[method]), progress=False)
    rtn = quantize_model(model, None, BayesQConfig(**cfg, method="rtn"), progress=False)
    names = [x.name for x in result.layers]
    if kind == "conv1d":
        assert {"c_fc", "c_proj"} <= set(names)
        of_kind = ["c_fc", "c_proj"]
    else:
        of_kind = [n for n in names if n.rsplit(".", 1)[-1] in
                   ("q_proj", "k_proj", "v_proj", "out_proj")]
        assert len(of_kind) == 4 * (2 if kind == "encoder" else 1)
    assert not result.skipped
    assert (_layer_errors(model, result.model, of_kind)
            < _layer_errors(model, rtn.model, of_kind))
    with torch.no_grad():
        torch.testing.assert_close(result.model(X), _dequantized(result.model)(X),
                                   rtol=1e-5, atol=1e-6)


def test_native_fast_path_skips_hooks_and_the_equivalent_matches_it():
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    seen = []
    mha.out_proj.register_forward_hook(lambda *_: seen.append(1))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = mha(x, x, x, need_weights=False)[0]
        out = LinearMultiheadAttention(mha)(x, x, x, need_weights=False)[0]
    assert not seen  # the reason for the equivalent: hooks never see the fused kernel's inputs
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_first,kdim,bias,bias_kv,zero_attn", [
    (True, None, True, False, False), (False, 12, True, True, False),
    (True, 12, False, False, True), (False, None, True, True, True)])
def test_linear_multihead_attention_is_equivalent(batch_first, kdim, bias, bias_kv, zero_attn):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero_attn,
                                kdim=kdim, vdim=kdim, batch_first=batch_first).eval()
    eq = LinearMultiheadAttention(mha)
    n, tgt, src = 3, 5, 7
    q = torch.randn(n, tgt, 16) if batch_first else torch.randn(tgt, n, 16)
    k = torch.randn(n, src, kdim or 16) if batch_first else torch.randn(src, n, kdim or 16)
    pad = torch.zeros(n, src, dtype=torch.bool)
    pad[0, -2:] = True
    masks = [{}, {"attn_mask": torch.rand(tgt, src) > 0.8}, {"key_padding_mask": pad},
             {"attn_mask": torch.randn(n * 4, tgt, src)}]
    for kw, need in itertools.product(masks, (True, False)):
        with torch.no_grad():
            ref = mha(q, k, k, need_weights=need, **kw)
            out = eq(q, k, k, need_weights=need, **kw)
        torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)
        if need:
            torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-6)


def test_encoder_equivalent_matches_with_padding_and_shares_weights():
    model = _model("encoder")
    work = linear_equivalent(model)
    assert isinstance(work.enc.layers[0].self_attn, LinearMultiheadAttention)
    w = model.enc.layers[0].self_attn.in_proj_weight
    assert work.enc.layers[0].self_attn.k_proj.weight.data_ptr() == w[16:].data_ptr()
    assert isinstance(model.enc.layers[0].self_attn, nn.MultiheadAttention)  # untouched
    with torch.no_grad():
        torch.testing.assert_close(work(X), model(X), rtol=1e-5, atol=1e-6)


def test_inplace_packs_the_attention_of_the_model_itself():
    model = _model("mha")
    ref = copy.deepcopy(model)
    result = quantize_model(model, LOADER, BayesQConfig(method="gptq", bits=8.0),
                            inplace=True, progress=False)
    assert result.model is model
    assert isinstance(model.attn, LinearMultiheadAttention)
    assert isinstance(model.attn.q_proj, QuantizedLinear)
    assert _error(model, ref) < 1e-2


def test_uncalled_layer_is_skipped_with_the_reason():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.unused = nn.Linear(8, 8), nn.Linear(8, 3), nn.Linear(8, 8)

        def forward(self, x):
            h = nn.functional.linear(x, self.a.weight, self.a.bias)  # a's hooks never fire
            return self.b(torch.relu(h)).mean(1)

    torch.manual_seed(0)
    result = quantize_model(Functional().eval(), LOADER, BayesQConfig(method="gptq", bits=8.0),
                            progress=False)
    assert [x.name for x in result.layers] == ["b"]
    assert set(result.skipped) == {"a", "unused"}
    assert "forward never ran" in result.skipped["a"]


def test_torchvision_vit_and_swin():
    tv = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    vit = tv.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                               hidden_dim=16, mlp_dim=32, num_classes=4)
    nn.init.normal_(vit.heads.head.weight)
    swin = tv.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                              window_size=[2, 2], num_classes=4)
    images = torch.randn(8, 3, 16, 16)
    for model, attn in ((vit.eval(), "self_attention.q_proj"), (swin.eval(), "attn.qkv")):
        with torch.no_grad():
            torch.testing.assert_close(linear_equivalent(model)(images), model(images))
        result = quantize_model(model, [images], BayesQConfig(method="gptq", bits=6.0),
                                progress=False)
        names = [x.name for x in result.layers]
        assert any(n.endswith(attn) for n in names), names
        assert not any("forward never ran" in r for r in result.skipped.values())
        with torch.no_grad():
            ref = model(images)
            assert float((result.model(images) - ref).norm() / ref.norm()) < 0.1


def _tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                  num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return transformers.GPT2ForSequenceClassification(cfg).eval()


def test_gpt2_conv1d_round_trips(tmp_path):
    model = _tiny_gpt2()
    ids = torch.randint(1, 64, (16, 7), generator=torch.Generator().manual_seed(2))
    loader = [{"input_ids": ids[:8], "labels": Y[:8]}, {"input_ids": ids[8:], "labels": Y[8:16]}]
    result = quantize_model(model, loader, BayesQConfig(method="gptq", bits=4.0), progress=False)
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"} <= {
        x.name for x in result.layers}
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)  # the caller's model as it was
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
    result.model.save_pretrained(tmp_path / "hf")
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert isinstance(loaded.transformer.h[0].attn.c_attn, QuantizedLinear)
    save_quantized(result.model, result, tmp_path / "artifact")
    restored = load_quantized(_tiny_gpt2(), tmp_path / "artifact")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, expected)
        assert torch.equal(restored(input_ids=ids).logits, expected)
