"""HuggingFace models on dict batches, both forward conventions, end to end: posterior fit,
GPTQ statistics, tables, evaluation, distillation (a tiny random BertConfig; no files, no
network)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from bayesq_lightning import (
    BayesQCallback,
    BayesQConfig,
    DistillConfig,
    distill,
    distill_model,
    quantize_model,
)
from bayesq_lightning.artifact import QuantizedLinear
from bayesq_lightning.batches import LogitsModel, takes_kwargs
from bayesq_lightning.lightning.models import HFSequenceClassifier
from bayesq_lightning.metrics import evaluate

transformers = pytest.importorskip("transformers")


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(cfg).eval()


def dict_data(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (n, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[: n // 2, 6:] = 0
    labels = (ids[:, 1] > 30).long()
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]}
            for i in range(n)]


class DictData(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(dict_data(64, 0), batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(dict_data(32, 1), batch_size=16)

    def calibration_dataloader(self):
        return DataLoader(dict_data(32, 2), batch_size=16)


def test_forward_convention_is_read_from_the_signature():
    bert = tiny_bert()
    batch = next(iter(DataLoader(dict_data(4, 0), batch_size=4)))

    class TakesDict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, batch):
            return self.bert(**batch).logits

    assert takes_kwargs(bert, {"input_ids": 0, "attention_mask": 0})
    assert not takes_kwargs(TakesDict(), {"input_ids": 0, "attention_mask": 0})
    a = LogitsModel(bert)(batch)
    b = LogitsModel(TakesDict())(batch)  # labels are dropped before either call
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="dict_forward"):
        LogitsModel(bert, dict_forward="positional")


@pytest.mark.parametrize("method", ["bayesq", "gptq"])
def test_raw_hf_model_keyword_convention(method):
    model = tiny_bert()
    calib = DataLoader(dict_data(32, 2), batch_size=16)
    test = DataLoader(dict_data(32, 1), batch_size=16)
    res = quantize_model(model, calib, BayesQConfig(bits=4.0, method=method, calib_batches=2),
                         n_data=64, progress=False)
    names = {x.name for x in res.layers}
    assert "classifier" in names and "bert.pooler.dense" in names
    assert any(".attention.self.query" in n for n in names)
    assert not any("embeddings" in n or "LayerNorm" in n for n in names)
    assert isinstance(res.model.bert.pooler.dense, QuantizedLinear)
    assert isinstance(res.model.bert.embeddings.word_embeddings, nn.Embedding)
    metrics = evaluate(res.model, test)
    assert set(metrics) == {"accuracy", "nll", "ece"}
    if method == "bayesq":
        rep = distill_model(model, res, calib, DistillConfig(epochs=1, holdout=0.25),
                            eval_loader=test, enable_progress_bar=False, accelerator="cpu",
                            devices=1)
        assert set(rep["distilled"]) == {"accuracy", "nll", "ece"}


def test_lightning_module_taking_the_batch_dict(tmp_path):
    tiny_bert().save_pretrained(tmp_path / "tiny")  # written here: no download
    module = HFSequenceClassifier(model_dir=str(tmp_path / "tiny"), num_labels=2)
    cb = BayesQCallback(bits=4.0, calib_batches=2, progress=False)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, accelerator="cpu", devices=1,
                         callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DictData())
    assert cb.result.posterior is not None and cb.result.info["n_calib"] == 32
    assert isinstance(module.model.classifier, QuantizedLinear)
    assert set(cb.report["quantized"]) == {"accuracy", "nll", "ece"}
    before = module.model.classifier.block0_scale.clone()
    distill(trainer, cb, DistillConfig(epochs=1, holdout=0.25, lr=1e-2))
    # the distilled dict-forward module is what the report measured
    assert cb.report["distilled"] == evaluate(module, DictData().val_dataloader())
    assert not torch.equal(before, module.model.classifier.block0_scale) or \
        cb.report["distill"]["best_epoch"] == 0
