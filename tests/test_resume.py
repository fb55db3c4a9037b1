"""Resume from a checkpoint: the callback's state rebuilds the quantized model bit for bit and
requantizes without refitting (``state_dict`` holds codes, allocation and posterior factors)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyData, TinyNet, assert_unchanged, make_data, snapshot

from bayesq_lightning import BayesQCallback, BayesQConfig, quantize_model, restore_quantized
from bayesq_lightning.state import StateError, fp32_weights, posterior_state, result_from_state


def _quantized_checkpoint(tmp_path, **fields):
    torch.manual_seed(0)
    model = TinyNet()
    cb = BayesQCallback(bits=3.0, calib_batches=2, evaluate=False, progress=False, **fields)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=4, accelerator="cpu", devices=1,
                         callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, TinyData())
    path = tmp_path / "quantized.ckpt"
    trainer.save_checkpoint(path)  # after quantization: the callback's state goes with it
    return model, cb, path


def _codes(result) -> list:
    return [(x.name, [(b.bits, b.codes, b.scale, b.zero, b.codebook) for b in x.blocks])
            for x in result.layers]


def _same_codes(a, b) -> bool:
    return all(n1 == n2 and all(
        x1[0] == x2[0] and all((t1 is None and t2 is None) or torch.equal(t1, t2)
                               for t1, t2 in zip(x1[1:], x2[1:], strict=True))
        for x1, x2 in zip(bl1, bl2, strict=True))
        for (n1, bl1), (n2, bl2) in zip(_codes(a), _codes(b), strict=True))


@pytest.mark.parametrize("structure", ["diag", "kron", "lowrank"])
def test_checkpoint_restores_the_quantized_model_and_requantizes_without_refit(
        tmp_path, structure, monkeypatch):
    model, cb, path = _quantized_checkpoint(tmp_path, structure=structure)
    ckpt = torch.load(path, weights_only=True)  # plain tensors and containers only

    restored = restore_quantized(TinyNet(), path)
    want, got = model.state_dict(), restored.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    x = make_data(16, seed=3).tensors[0]
    with torch.no_grad():
        assert torch.equal(restored.model.eval()(x), model.eval()(x))
    assert _same_codes(restored, cb.result)

    # the saved posterior is the fitted one, exactly; with the FP32 weights it holds (its
    # means) it requantizes to the same codes, and no fit runs
    post = restored.posterior
    assert post.structure == structure
    for name, lp in cb.result.posterior.layers.items():
        assert torch.equal(post.layers[name].curvature, lp.curvature)
    fp32 = TinyNet()
    state = {k: v for k, v in ckpt["state_dict"].items() if "block" not in k}
    fp32.load_state_dict({**state, **fp32_weights(post)}, strict=True)

    def no_fit(*args, **kwargs):
        raise AssertionError("refitted")

    monkeypatch.setattr("bayesq_lightning.quantize.fit_posterior", no_fit)
    cfg = BayesQConfig(**{**cb.state_dict()["config"], "calib_batches": 2})
    again = quantize_model(fp32.eval(), cb.calibration_batches, cfg, posterior=post,
                           progress=False)
    assert _same_codes(again, cb.result)

    fresh = BayesQCallback()  # the callback itself restores from the checkpoint's entry
    fresh.load_state_dict(next(v for k, v in ckpt["callbacks"].items()
                               if k.startswith("BayesQCallback")))
    assert _same_codes(fresh.result, cb.result) and fresh.result.posterior is not None


def test_restore_refuses_a_mismatched_model_or_checkpoint(tmp_path):
    _, _, path = _quantized_checkpoint(tmp_path, structure="diag")
    wrong = torch.nn.Sequential(torch.nn.Linear(4, 4))
    before = snapshot(wrong)
    with pytest.raises(ValueError, match="does not fit this model.*fresh instance"):
        restore_quantized(wrong, path)
    assert_unchanged(wrong, before)
    with pytest.raises(ValueError, match="0 quantized BayesQCallback states.*after"):
        restore_quantized(TinyNet(), {"state_dict": {}, "callbacks": {}})
    with pytest.raises(StateError, match="version.*quantize again"):
        result_from_state({"version": 99})
    with pytest.raises(StateError, match="version None.*quantize again"):
        restore_quantized(TinyNet(), {"state_dict": {}, "callbacks": {
            "BayesQCallback": {"report": {}}}})  # no saved result


def test_checkpoint_state_is_cpu_and_lean(tmp_path):
    _, cb, path = _quantized_checkpoint(tmp_path, structure="kron")
    entry = next(v for k, v in torch.load(path, weights_only=True)["callbacks"].items()
                 if k.startswith("BayesQCallback"))
    for layer in entry["posterior"]["layers"].values():
        assert layer["structure"] == "kron" and {"A", "G", "mean"} <= set(layer)
        # derived from the factors (and delta) when read: nothing weight-sized stored for them
        assert layer["precision"] is None and layer["curvature"] is None
        assert all(t.device.type == "cpu" for t in layer.values() if torch.is_tensor(t))
    restored = posterior_state(restore_quantized(TinyNet(), path).posterior)
    assert restored["layers"].keys() == entry["posterior"]["layers"].keys()
