"""Shared by the tests of the files seqfuse writes and reads, one file per entry point:
test_train_files.py (checkpoints), test_export_files.py (the atomic export, load_runner)
and test_predict_files.py (the artifact files `seqfuse predict` loads): the model they
use, its checkpoint and export, and the ways a file is damaged. The fixtures built from
these (checkpoints, artifact, ckpt, art) are in conftest.py.
"""
from __future__ import annotations

from pathlib import Path

import torch

from seqfuse.cli import main
from seqfuse.zoo.data import Vocab
from seqfuse.zoo.export import export_checkpoint
from seqfuse.zoo.models import MODELS
from seqfuse.zoo.train import save_checkpoint

NAME = "bilstm-classifier"
CONFIG = dict(vocab_size=20, embed_dim=8, hidden_size=8, num_classes=2)
VOCAB = Vocab(["<pad>", "<unk>"] + [f"w{i}" for i in range(18)])
TEXTS = ["w1 w2 w3", "w4 hello"]


def make_checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = MODELS[NAME](**CONFIG)
    return save_checkpoint(model, NAME, VOCAB, path, metrics={"test": {"accuracy": 0.5}})


def export(ckpt: Path, out: Path, **kw):
    return export_checkpoint(ckpt, out, formats=["onnx"], use_data=False, **kw)


def cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
