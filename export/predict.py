"""`seqfuse predict ARTIFACT_DIR INPUT ...`: the embedded serving default.

Loads the artifact's ONNX model(s) in onnxruntime with the saved vocabularies and answers
raw inputs, tokenised exactly as in training (the tokenizer is named in the manifest's
"serving" section):
  text classifiers  a text          -> label and class probabilities (and, for
                                       bilstm-attention, each token's attention weight)
  lstm-tagger       phonemes        -> a stress tag per phoneme ("K AE T" -> "- 1 -")
  seq2seq           a word          -> its phonemes, greedy decoding in onnxruntime
  dense models      a .npy file or a JSON array of the model's input shape
Inputs are run in batches (padded to the longest of each batch, with their lengths).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from seqfuse.data import Vocab, pad_batch
from seqfuse.data.cmudict import strip_stress
from seqfuse.data.text import UNK, tokenize

from .runtime import OrtModel


class PredictError(ValueError):
    """An input the served model cannot take (names the input)."""


def tokens_of(text: str, serving: dict) -> list[str]:
    """Raw text -> tokens, as the model's data set tokenised its training split."""
    kind = serving.get("tokenizer")
    if kind == "words":
        return tokenize(text)[: serving.get("max_tokens", 64)] or [UNK]
    if kind == "characters":
        return list(text.strip().lower())
    if kind == "phonemes":
        return [strip_stress(p)[0] for p in text.upper().split()]
    raise PredictError(f"the manifest names an unknown tokenizer {kind!r}")


def _dense(item: str, shape: list[int]) -> np.ndarray:
    """A .npy path or a JSON array -> float32 array of `shape`."""
    try:
        x = np.load(item) if item.endswith(".npy") and Path(item).is_file() else np.asarray(json.loads(item))
    except (ValueError, OSError) as exc:
        raise PredictError(f"input {item[:40]!r}: expected a .npy file or a JSON array: {exc}") from exc
    x = np.asarray(x, dtype=np.float32)
    if list(x.shape) != list(shape):
        raise PredictError(f"input {item[:40]!r}: expected shape {shape}, got {list(x.shape)}")
    if not np.isfinite(x).all():
        raise PredictError(f"input {item[:40]!r}: contains NaN or infinity")
    return x


class Predictor:
    def __init__(self, artifact_dir: str | Path, variant: str | None = None, threads: int | None = None):
        self.dir = Path(artifact_dir)
        self.model = OrtModel.from_artifact(self.dir, variant, threads)
        self.manifest = json.loads((self.dir / "manifest.json").read_text())
        self.serving = self.manifest.get("serving") or {}
        if not self.serving.get("input"):
            raise PredictError(f"{self.dir}/manifest.json has no serving section: export the model from "
                               "a zoo checkpoint (seqfuse export) to serve it with seqfuse predict")
        self.vocab = Vocab.load(self.dir / "vocab.json") if (self.dir / "vocab.json").is_file() else None
        self.is_seq2seq = "encoder" in self.manifest["parts"]

    def _vocab(self, key: str) -> Vocab:
        return Vocab.load(self.dir / self.serving[key])

    def __call__(self, inputs: list[str], batch_size: int = 64) -> list[dict]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out: list[dict] = []
        for start in range(0, len(inputs), batch_size):
            out += self._batch(inputs[start:start + batch_size])
        return out

    def _batch(self, items: list[str]) -> list[dict]:
        s = self.serving
        if s["input"] == "dense":
            x = torch.from_numpy(np.stack([_dense(i, s["shape"]) for i in items]))
            out = self.model(x)
            if "labels" in s:
                return self._classes(items, out, [None] * len(items))
            return [{"input": i[:40], "prediction": float(v)} for i, v in zip(items, out.tolist())]
        tokens = [tokens_of(i, s) for i in items]
        for item, toks in zip(items, tokens):
            if not toks:
                raise PredictError(f"input {item!r} has no tokens")
        ids, lengths = pad_batch([self.vocab.encode(t) for t in tokens])
        if self.is_seq2seq:
            hyps, _ = self.model.greedy_decode(ids, lengths)
            phones = self._vocab("target_vocab")
            return [{"input": i, "output": " ".join(phones.itos[t] for t in h)} for i, h in zip(items, hyps)]
        out = self.model(ids, lengths)
        if "tags" in s:
            tags = self._vocab("tags")
            pred = out.argmax(-1)
            return [{"input": i, "tokens": t, "tags": [tags.itos[k] for k in pred[r, :len(t)].tolist()]}
                    for r, (i, t) in enumerate(zip(items, tokens))]
        return self._classes(items, out, tokens)

    def _classes(self, items, out, tokens) -> list[dict]:
        logits, weights = (out if isinstance(out, tuple) else (out, None))
        probs = torch.softmax(logits.float(), -1)
        labels = self.serving.get("labels") or [str(i) for i in range(probs.shape[1])]
        rows = []
        for r, item in enumerate(items):
            row = {"input": item, "label": labels[int(probs[r].argmax())],
                   "probabilities": {lab: round(float(p), 6) for lab, p in zip(labels, probs[r])}}
            if weights is not None and tokens[r] is not None:
                row["attention"] = [[tok, round(float(w), 6)] for tok, w in zip(tokens[r], weights[r])]
            rows.append(row)
        return rows


def format_rows(rows: list[dict]) -> str:
    """Human-readable lines: the prediction, then the input."""
    lines = []
    for row in rows:
        if "label" in row:
            p = row["probabilities"][row["label"]]
            line = f"{row['label']:<8} {p:.3f}  {row['input']}"
            if "attention" in row:
                top = sorted(row["attention"], key=lambda tw: -tw[1])[:3]
                line += "   [attends to: " + ", ".join(f"{t} {w:.2f}" for t, w in top) + "]"
        elif "tags" in row:
            line = " ".join(f"{t}/{g}" for t, g in zip(row["tokens"], row["tags"]))
        elif "output" in row:
            line = f"{row['input']:<16} {row['output']}"
        else:
            v = row["prediction"]
            line = f"{v:.6f}" if math.isfinite(v) else str(v)
            line += f"  {row['input']}"
        lines.append(line)
    return "\n".join(lines)
