"""Shared by the tests of the files seqfuse writes and reads, one file per entry point:
test_train_files.py (checkpoints), test_export_files.py (the atomic export, load_runner)
and test_predict_files.py (the artifact files `seqfuse predict` loads): the model they
use, its checkpoint and export, and the ways a file is damaged. The fixtures built from
these (checkpoints, artifact, ckpt, art) are in conftest.py.

The destination tests (what --out may replace) share `tree` (a folder's files, to show it
is untouched), `refused` (the one-line error of a refusal) and `run` (the real entry point
in a child process, for what depends on the current folder).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
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


def tree(folder: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under `folder` (links as their target)."""
    return {str(p.relative_to(folder)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def refused(code: int, err: str, *patterns: str) -> None:
    """A refusal: exit status 2, one line on stderr matching each pattern, no traceback."""
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for pattern in patterns:
        assert re.search(pattern, err), (pattern, err)


def run(*args, cwd: Path, timeout: float = 300) -> tuple[int, str, str]:
    """`python -m seqfuse.cli ARGS` in `cwd`: (exit status, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-m", "seqfuse.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=cwd)
    return r.returncode, r.stdout, r.stderr
