"""Training and evaluation loops for the text classifiers, and checkpoints.

A checkpoint folder holds config.json (model name and constructor arguments),
model.pt (the state_dict, loaded with weights_only=True) and vocab.json.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import TextSplit, Vocab, bucketed_batches
from .models import MODELS


@dataclass
class TrainResult:
    losses: list[float]  # mean training loss per epoch
    valid_accuracy: list[float]
    seconds: float


def evaluate(model: nn.Module, split: TextSplit, batch_size: int = 256) -> float:
    """Accuracy on `split`."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for ids, lengths, labels in bucketed_batches(split, batch_size, shuffle=False):
            correct += int((model(ids, lengths).argmax(1) == labels).sum())
    return correct / max(len(split), 1)


def train_classifier(model: nn.Module, train: TextSplit, valid: TextSplit, *, epochs: int = 3,
                     batch_size: int = 64, lr: float = 2e-3, clip: float = 1.0, seed: int = 0,
                     max_minutes: float | None = None, progress: bool = True) -> TrainResult:
    """Adam + cross-entropy with gradient clipping over length-bucketed batches."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    losses, accs = [], []
    for epoch in range(epochs):
        model.train()
        total, count = 0.0, 0
        n_batches = math.ceil(len(train) / batch_size)
        bar = tqdm(bucketed_batches(train, batch_size, True, gen), total=n_batches,
                   desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=True)
        for ids, lengths, labels in bar:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(ids, lengths), labels)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            total += loss.item() * len(labels)
            count += len(labels)
            bar.set_postfix(loss=f"{total / count:.4f}")
            if max_minutes is not None and time.perf_counter() - start > 60 * max_minutes:
                break
        losses.append(total / max(count, 1))
        accs.append(evaluate(model, valid))
        if progress:
            tqdm.write(f"epoch {epoch + 1}: train loss {losses[-1]:.4f}, valid accuracy {accs[-1]:.4f}")
        if max_minutes is not None and time.perf_counter() - start > 60 * max_minutes:
            break
    return TrainResult(losses, accs, time.perf_counter() - start)


def save_checkpoint(model: nn.Module, name: str, vocab: Vocab, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"model": name, "config": model.config}, indent=2))
    torch.save(model.state_dict(), out / "model.pt")
    vocab.save(out / "vocab.json")
    return out


def load_checkpoint(ckpt_dir: str | Path) -> tuple[nn.Module, str, Path]:
    """-> (model in eval mode, model name, vocab path)."""
    ckpt = Path(ckpt_dir)
    for f in ("config.json", "model.pt"):
        if not (ckpt / f).is_file():
            raise FileNotFoundError(f"checkpoint folder {ckpt} has no {f}")
    meta = json.loads((ckpt / "config.json").read_text())
    if meta.get("model") not in MODELS:
        raise ValueError(f"{ckpt}/config.json names model {meta.get('model')!r}; known: {sorted(MODELS)}")
    model = MODELS[meta["model"]](**meta["config"])
    model.load_state_dict(torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True))
    return model.eval(), meta["model"], ckpt / "vocab.json"
