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
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
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


class EmbeddingNet(nn.Module):
    """Ids (only the first 24 of 40 rows looked up) -> embedding -> Linear -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 64)
        self.fc, self.head = nn.Linear(64, 16), nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.emb(ids))).mean(1))


MODELS = {"mha": AttentionNet, "mha_kdim": lambda: AttentionNet(12), "encoder": EncoderNet,
          "conv1d": Conv1DNet, "embedding": EmbeddingNet}
METHODS = {"gptq": {"method": "gptq"}, "diag": {"structure": "diag"},
           "kron": {"structure": "kron"}}
X = torch.randn(32, 6, 8, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1))
LOADER = [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 32, 16)]
# token ids weighted towards rows 16-23, rows 24.. never looked up
IDS = 23 - (torch.rand(32, 6, generator=torch.Generator().manual_seed(3)) ** 3 * 24).long()
ID_LOADER = [(IDS[i:i + 16], Y[i:i + 16]) for i in range(0, 32, 16)]


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[kind]().eval()


def _dequantized(model: nn.Module) -> nn.Module:
    """``model`` with every packed layer replaced by the float layer of its decoded weight."""
    dense = copy.deepcopy(model)
    for name, m in list(dense.named_modules()):
        if isinstance(m, PackedLayer):
            set_submodule(dense, name, m.to_float())
    return dense


def _layer_errors(model: nn.Module, packed: nn.Module, names: list[str], x) -> float:
    """``sum ||(W_q - W) x||^2`` over the layers ``names`` and their inputs ``x`` in ``model``
    (an embedding's: its looked-up rows' errors)."""
    work = linear_equivalent(model)
    inputs: dict[str, list] = {n: [] for n in names}
    hooks = [work.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: inputs[n].append(args[0])) for n in names]
    with torch.no_grad():
        work(x)
    for h in hooks:
        h.remove()
    total = 0.0
    for n in names:
        dw = packed.get_submodule(n).dequantize() - work.get_submodule(n).weight
        for v in inputs[n]:
            out = dw[v] if isinstance(work.get_submodule(n), nn.Embedding) else v @ dw.T
            total += float(out.pow(2).sum())
    return total


def _error(model: nn.Module, ref: nn.Module) -> float:
    with torch.no_grad():
        return float((model(X) - ref(X)).pow(2).mean())


def _of_kind(kind: str, names: list[str]) -> list[str]:
    if kind == "conv1d":
        return ["c_fc", "c_proj"]
    if kind == "embedding":
        return ["emb"]
    return [n for n in names if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "out_proj")]


@pytest.mark.parametrize("kind,method", itertools.product(MODELS, METHODS))
def test_layer_kind_is_quantized_and_beats_rtn(kind, method):
    model = _model(kind)
    x, loader = (IDS, ID_LOADER) if kind == "embedding" else (X, LOADER)
    cfg = {"bits": 8.0, "allowed_bits": (2,), "calib_batches": 2}
    if kind == "embedding":  # mixed widths: the lookups decide which rows get more bits
        cfg.update(bits=3.75, allowed_bits=(2, 3, 4, 8), block_rows=8, quantize_embeddings=True,
                   include=["emb"])
    result = quantize_model(model, loader, BayesQConfig(**cfg, **METHODS[method]), progress=False)
    rtn = quantize_model(model, None, BayesQConfig(**cfg, method="rtn"), progress=False)
    of_kind = _of_kind(kind, [x.name for x in result.layers])
    assert set(of_kind) <= {x.name for x in result.layers}
    assert len(of_kind) == {"encoder": 4, "mha": 4, "mha_kdim": 4}.get(kind, len(of_kind))
    assert not set(of_kind) & set(result.skipped)
    assert (_layer_errors(model, result.model, of_kind, x)
            < _layer_errors(model, rtn.model, of_kind, x))
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), _dequantized(result.model)(x),
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


def test_embeddings_are_opt_in_and_unseen_rows_get_the_floor():
    model = _model("embedding")
    plain = quantize_model(model, ID_LOADER, BayesQConfig(method="gptq", bits=6.0),
                           progress=False)
    assert "quantize_embeddings=True" in plain.skipped["emb"]
    with pytest.raises(TypeError, match="quantize_embeddings"):
        BayesQConfig(quantize_embeddings="yes")
    cfg = BayesQConfig(method="gptq", bits=3.75, allowed_bits=(2, 3, 4, 8), block_rows=8,
                       quantize_embeddings=True)
    result = quantize_model(model, ID_LOADER, cfg, progress=False)
    floor = result.info["embedding_floor"]
    assert floor["bits"] == 3 and {"emb[24:32]", "emb[32:40]"} <= set(floor["blocks"])
    emb = result.layer("emb")
    assert emb.kind == "embedding"
    assert [b.bits >= 3 for b in emb.blocks if b.rows[0] >= 24] == [True, True]
    n_weights = sum(x.n_weights for x in result.layers)
    assert n_weights == 40 * 64 + 64 * 16 + 16 * 3  # the embedding counted in the budget
    assert result.bits_per_weight <= 3.75


class TiedLM(nn.Module):
    """An embedding whose weight is also the output head's (GPT-2's ``wte`` / ``lm_head``)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(40, 32)
        self.fc = nn.Linear(32, 32)
        self.lm_head = nn.Linear(32, 40, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.fc(self.wte(ids))).mean(1))


class SharedEmbedding(nn.Module):
    """T5's ``shared``: looked up only through the embeddings tied to it."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(40, 32)
        self.encoder_tokens = nn.Embedding(40, 32)
        self.encoder_tokens.weight = self.shared.weight
        self.head = nn.Linear(32, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder_tokens(ids).mean(1))


@pytest.mark.parametrize("cls,method,owner,alias", [
    (TiedLM, "gptq", "wte", "lm_head"), (TiedLM, "kron", "wte", "lm_head"),
    (SharedEmbedding, "diag", "encoder_tokens", "shared")])
def test_tied_embedding_is_quantized_once(tmp_path, cls, method, owner, alias):
    torch.manual_seed(0)
    model = cls().eval()
    result = quantize_model(model, ID_LOADER, BayesQConfig(
        bits=6.0, quantize_embeddings=True, **METHODS[method]), progress=False)
    assert result.tied == {alias: owner} and not result.skipped
    assert result.layer(owner).kind == "embedding"
    packed = result.model
    assert getattr(packed, owner).block0_codes is getattr(packed, alias).block0_codes
    save_quantized(packed, result, tmp_path)
    restored = load_quantized(cls().eval(), tmp_path)
    with torch.no_grad():
        assert torch.equal(restored(IDS), packed(IDS))
        assert float((packed(IDS) - model(IDS)).pow(2).mean()) < 0.05


def test_bert_embeddings_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 64, (16, 9), generator=torch.Generator().manual_seed(4))
    loader = [{"input_ids": ids[:8], "labels": Y[:8]}, {"input_ids": ids[8:], "labels": Y[8:16]}]
    result = quantize_model(model, loader, BayesQConfig(method="gptq", bits=4.5,
                                                        quantize_embeddings=True),
                            progress=False)
    assert result.layer("bert.embeddings.word_embeddings").kind == "embedding"
    result.model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
