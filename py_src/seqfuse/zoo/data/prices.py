"""Daily stock prices: Microsoft's OHLCV from 1986-03-13 to 2017-11-10 (7,983 trading
days) that ship in the pmdarima wheel (datasets/data/msft.tar.gz, msft.csv)."""
from __future__ import annotations

import csv
import io
import tarfile

import numpy as np
import torch

from .common import package_dir
from .digits import TensorSplit

FEATURES = ("open", "high", "low", "close", "volume")


def load_msft() -> dict[str, np.ndarray]:
    """Columns date (str), open, high, low, close, volume (float64), oldest first."""
    path = package_dir("pmdarima") / "datasets" / "data" / "msft.tar.gz"
    with tarfile.open(path) as tar:
        member = tar.extractfile("msft.csv")
        if member is None:
            raise FileNotFoundError(f"{path} has no msft.csv")
        rows = list(csv.DictReader(io.TextIOWrapper(member, encoding="utf-8")))
    cols = {"date": np.array([r["Date"] for r in rows])}
    for name in FEATURES:
        cols[name] = np.array([float(r[name.capitalize()]) for r in rows])
    return cols


def msft_splits(window: int = 30, valid: float = 0.1, test: float = 0.1) -> tuple[dict[str, TensorSplit], dict]:
    """Windows of `window` days of features -> the next day's close, split in time order
    (train on the oldest days, test on the newest; no window crosses a split).

    Each day's features, all relative so that 1986 and 2017 look alike: log(open, high,
    low, close / previous close) and log(volume / previous volume), standardised with the
    training days' mean and std. The target is the next close normalised by the window's
    last close, (close[t+1] / close[t] - 1) / s, s the training days' std of that ratio;
    the last-value baseline (tomorrow's close = today's) is 0 in these units.
    Returns ({split: TensorSplit(x [N, window, 5], y [N], baseline [N])}, stats)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    d = load_msft()
    prev_close = d["close"][:-1]
    feats = np.stack([np.log(d[k][1:] / prev_close) for k in ("open", "high", "low", "close")]
                     + [np.log((d["volume"][1:] + 1.0) / (d["volume"][:-1] + 1.0))], axis=1)
    ret = d["close"][1:] / prev_close - 1.0  # ret[i]: day i+1 over day i; feats[i] is day i+1
    n = len(feats)
    n_test, n_valid = int(n * test), int(n * valid)
    n_train = n - n_test - n_valid
    mean, std = feats[:n_train].mean(0), feats[:n_train].std(0) + 1e-12
    scale = float(ret[:n_train].std())
    feats = (feats - mean) / std
    # a window ends at feature day e (inclusive); its target is ret[e + 1]
    ends = np.arange(window - 1, n - 1)
    bounds = {"train": (0, n_train), "valid": (n_train, n_train + n_valid), "test": (n_train + n_valid, n)}
    splits = {}
    for name, (lo, hi) in bounds.items():
        e = ends[(ends - window + 1 >= lo) & (ends + 1 < hi)]
        x = np.stack([feats[i - window + 1:i + 1] for i in e]).astype(np.float32)
        y = (ret[e + 1] / scale).astype(np.float32)
        splits[name] = TensorSplit(torch.from_numpy(x), torch.from_numpy(y), torch.zeros(len(y)))
    stats = {"window": window, "return_scale": scale, "feature_mean": mean.tolist(),
             "feature_std": std.tolist(), "test_first_date": str(d["date"][1 + bounds["test"][0]])}
    return splits, stats
