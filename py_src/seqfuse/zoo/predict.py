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

Before anything is loaded, the sha256 of every file it reads (the graphs of the chosen
variant, the vocabularies) and of the manifest's settings (serving, config, decoding) is
checked against manifest.json: a truncated, corrupted or edited file or setting is an
ArtifactError (a ValueError) naming it. The serving section's types are checked too.

A dense input is checked before its data is read: a .npy file's header must give the
model's shape, a real dtype (bool, integer or float: no complex, object or strings) and
exactly the file's size; a JSON array must hold numbers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from .data import Vocab, pad_batch
from .data.cmudict import strip_stress
from .data.text import UNK, tokenize

from seqfuse.export.runtime import ArtifactError, OrtModel, read_manifest, verify_artifact, verify_settings

# serving key -> the vocabulary file it names; the model config key of its size
_VOCABS = {"target_vocab": "tgt_vocab_size", "tags": "num_tags"}
_INPUT_SIZE = ("vocab_size", "src_vocab_size")


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


_REAL_KINDS = "biuf"  # numpy dtype kinds a dense input may have: bool, int, uint, float


def _real(item: str, dtype: np.dtype) -> None:
    if dtype.kind not in _REAL_KINDS or dtype.hasobject:
        raise PredictError(f"input {item[:40]!r}: expected real numbers, got dtype {dtype} (complex, "
                           "object, string and structured arrays are refused)")


def _read_npy(path: str, shape: list[int]) -> np.ndarray:
    """A .npy file of `shape` and a real dtype, checked from its header (numpy.lib.format)
    before any data is read: a header that claims another shape, or more data than the
    file holds, is refused without allocating it."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            got, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            got, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
        _real(path, dtype)
        if list(got) != list(shape):
            raise PredictError(f"input {path[:40]!r}: expected shape {shape}, got {list(got)}")
        need = math.prod(got) * dtype.itemsize
        have = Path(path).stat().st_size - f.tell()
        if have != need:
            raise PredictError(f"input {path[:40]!r}: its header gives {need} bytes of data, the file holds "
                               f"{have} (truncated or corrupted?)")
        return np.load(path, allow_pickle=False)


def _dense(item: str, shape: list[int]) -> np.ndarray:
    """A .npy path or a JSON array -> float32 array of `shape`."""
    try:
        if item.endswith(".npy") and Path(item).is_file():
            x = _read_npy(item, shape)
        else:
            x = np.asarray(json.loads(item))
    except RecursionError as exc:
        raise PredictError(f"input {item[:40]!r}: the JSON array nests too deeply") from exc
    except (ValueError, OSError, EOFError) as exc:
        raise PredictError(f"input {item[:40]!r}: expected a .npy file or a JSON array: {exc}") from exc
    _real(item, x.dtype)
    x = np.asarray(x, dtype=np.float32)
    if list(x.shape) != list(shape):
        raise PredictError(f"input {item[:40]!r}: expected shape {shape}, got {list(x.shape)}")
    if not np.isfinite(x).all():
        raise PredictError(f"input {item[:40]!r}: contains NaN or infinity")
    return x


def load_vocab(path: Path, size: int | None = None, needs_unk: bool = False) -> Vocab:
    """A vocabulary file: a JSON list of distinct tokens (`size` of them, when given)."""
    try:
        tokens = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON (truncated or corrupted?): {exc}") from exc
    except RecursionError as exc:
        raise ArtifactError(f"{path} nests its JSON too deeply (corrupted?)") from exc
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ArtifactError(f"{path} must hold a non-empty JSON list of tokens (strings)")
    if len(set(tokens)) != len(tokens):
        raise ArtifactError(f"{path} lists a token twice (corrupted?)")
    if isinstance(size, int) and len(tokens) != size:
        raise ArtifactError(f"{path} has {len(tokens)} tokens, the model was exported with {size}")
    if needs_unk and UNK not in tokens:
        raise ArtifactError(f"{path} has no {UNK} token")
    return Vocab(tokens)


_TOKENIZERS = ("words", "characters", "phonemes")


def check_serving(serving: dict, path: Path) -> None:
    """The manifest's serving section has the types predict reads: raise ArtifactError
    naming the key otherwise."""
    def bad(key: str, want: str):
        return ArtifactError(f"{path}: serving {key!r} must be {want}, got {serving[key]!r}"[:300])

    def positive_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    kind = serving.get("input")
    if kind not in ("text", "dense"):
        raise ArtifactError(f"{path}: serving 'input' must be \"text\" or \"dense\", got {kind!r}"[:300])
    if kind == "text" and serving.get("tokenizer") not in _TOKENIZERS:
        raise ArtifactError(f"{path}: serving 'tokenizer' must be one of {list(_TOKENIZERS)}, got "
                            f"{serving.get('tokenizer')!r}"[:300])
    if kind == "dense" and not (isinstance(serving.get("shape"), list) and serving["shape"]
                                and all(map(positive_int, serving["shape"]))):
        raise ArtifactError(f"{path}: serving 'shape' must be a non-empty list of positive integers, got "
                            f"{serving.get('shape')!r}"[:300])
    if "max_tokens" in serving and not positive_int(serving["max_tokens"]):
        raise bad("max_tokens", "a positive integer")
    if "labels" in serving and not (isinstance(serving["labels"], list) and serving["labels"]
                                    and all(isinstance(v, str) for v in serving["labels"])):
        raise bad("labels", "a non-empty list of strings")
    for key in _VOCABS:
        if key in serving and not isinstance(serving[key], str):
            raise bad(key, "a file name")


class Predictor:
    """Serve an artifact folder. verify (default): check the sha256 of every file it
    loads against manifest.json first."""

    def __init__(self, artifact_dir: str | Path, variant: str | None = None, threads: int | None = None,
                 *, verify: bool = True, runtime: str = "onnx"):
        self.dir = Path(artifact_dir)
        self.manifest = read_manifest(self.dir)
        self.model = OrtModel.from_artifact(self.dir, variant, threads, verify=verify, runtime=runtime)
        self.serving = self.manifest.get("serving") or {}
        if not self.serving.get("input"):
            raise PredictError(f"{self.dir}/manifest.json has no serving section: export the model from "
                               "a zoo checkpoint (seqfuse export) to serve it with seqfuse predict")
        if verify:
            verify_settings(self.dir, self.manifest)
        check_serving(self.serving, self.dir / "manifest.json")
        config = self.manifest.get("config") or {}
        text = self.serving["input"] == "text"
        keys = [k for k in _VOCABS if k in self.serving]
        files = (["vocab.json"] if text else []) + [self.serving[k] for k in keys]
        if verify:
            verify_artifact(self.dir, files, self.manifest)
        for name in files:
            if not isinstance(name, str) or Path(name).name != name or not (self.dir / name).is_file():
                raise ArtifactError(f"{self.dir / str(name)} is missing (the manifest's serving section "
                                    "needs it)")
        self.vocab = load_vocab(self.dir / "vocab.json", next((config[k] for k in _INPUT_SIZE if k in config),
                                                              None), needs_unk=True) if text else None
        self._vocabs = {k: load_vocab(self.dir / self.serving[k], config.get(_VOCABS[k])) for k in keys}
        labels = self.serving.get("labels")
        if labels is not None and isinstance(config.get("num_classes"), int) and (
                not isinstance(labels, list) or len(labels) != config["num_classes"]):
            raise ArtifactError(f"{self.dir}/manifest.json: serving labels {labels!r} do not name the "
                                f"model's {config['num_classes']} classes")
        self.is_seq2seq = "encoder" in self.manifest["parts"]

    def _vocab(self, key: str) -> Vocab:
        return self._vocabs[key]

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
