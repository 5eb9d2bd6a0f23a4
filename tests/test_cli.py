"""The `seqfuse` command line, run as `python -m seqfuse.cli` subprocesses: train writes a
complete checkpoint folder, evaluate reproduces its test metrics, models lists the zoo,
and mistakes exit with status 2 and a message (a few extra error cases call
seqfuse.cli.main in-process, to save the interpreter start-up)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from seqfuse.cli import main
from seqfuse.zoo.models import MODELS

NAMES = ["lstm-classifier", "bilstm-classifier", "bilstm-attention", "bigru-classifier",
         "transformer-classifier", "lstm-rows", "lstm-regressor", "lstm-tagger",
         "seq2seq-attention"]
PNG = b"\x89PNG\r\n\x1a\n"


def seqfuse(*args, cwd, timeout=300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "seqfuse.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """`seqfuse train bilstm-attention` on 200 examples of each split, one epoch."""
    work = tmp_path_factory.mktemp("cli")
    out = work / "ckpt"
    r = seqfuse("train", "bilstm-attention", "--limit", 200, "--epochs", 1, "--batch-size", 64,
                "--out", out, cwd=work)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    return out, r


def test_train_writes_checkpoint_folder(checkpoint):
    out, r = checkpoint
    assert f"wrote {out}" in r.stdout
    assert "bilstm-attention: best epoch 1" in r.stdout
    files = {p.name for p in out.iterdir()}
    assert files == {"config.json", "model.safetensors", "vocab.json", "metrics.json",
                     "training_curves.png", "attention.png"}
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(".ckpt")]
    assert not leftovers, "temporary folder left behind"

    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "bilstm-attention"
    assert config["vocabs"] == ["vocab.json"]
    assert config["training"]["epochs"] == 1 and config["training"]["batch_size"] == 64
    assert config["data"]["limit"] == 200
    assert config["data"]["sizes"] == {"train": 200, "valid": 200, "test": 200}

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1
    assert [h["epoch"] for h in metrics["history"]] == [1]
    hist = metrics["history"][0]
    assert hist["train_loss"] > 0 and hist["samples_per_s"] > 0
    assert set(hist["valid"]) == {"accuracy", "macro_f1"}
    assert metrics["best_valid"] == hist["valid"]
    assert set(metrics["test"]) == {"accuracy", "macro_f1"}
    assert all(0.0 <= v <= 1.0 for v in metrics["test"].values())
    assert metrics["stopped_early"] is False

    for png in ("training_curves.png", "attention.png"):
        assert (out / png).read_bytes()[:8] == PNG, png
    vocab = json.loads((out / "vocab.json").read_text())  # the token list, index = id
    assert vocab[:2] == ["<pad>", "<unk>"] and len(vocab) == config["config"]["vocab_size"]


def test_checkpoint_loads(checkpoint):
    import torch

    from seqfuse.zoo.train import load_checkpoint

    out, _ = checkpoint
    model, name, vocab = load_checkpoint(out)
    assert name == "bilstm-attention" and vocab == out / "vocab.json"
    assert type(model) is MODELS["bilstm-attention"] and not model.training
    logits, weights = model(torch.tensor([[5, 6, 7, 0]]), torch.tensor([3]))
    assert logits.shape == (1, 2) and weights.shape == (1, 4)


def test_evaluate_reproduces_test_metrics(checkpoint, tmp_path):
    out, _ = checkpoint
    metrics = json.loads((out / "metrics.json").read_text())
    r = seqfuse("evaluate", out, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout) == metrics["test"]  # exactly: same data slice, same weights


def test_evaluate_valid_split_reproduces_best_valid(checkpoint, capsys):
    out, _ = checkpoint
    metrics = json.loads((out / "metrics.json").read_text())
    assert main(["evaluate", str(out), "--split", "valid", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics["best_valid"]


def test_evaluate_bad_split_exits_2(checkpoint, capsys):
    out, _ = checkpoint
    assert main(["evaluate", str(out), "--split", "nope"]) == 2
    err = capsys.readouterr().err
    assert "seqfuse evaluate:" in err and "split must be one of" in err


def test_evaluate_missing_folder_exits_2(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    r = seqfuse("evaluate", missing, "--json", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout == ""
    assert "seqfuse evaluate:" in r.stderr and str(missing) in r.stderr
    assert "config.json" in r.stderr or "not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_train_unknown_model_exits_2(tmp_path):
    r = seqfuse("train", "no-such-model", "--out", tmp_path / "x", cwd=tmp_path)
    assert r.returncode == 2
    assert "unknown model 'no-such-model'" in r.stderr
    assert "lstm-classifier" in r.stderr  # it lists the choices
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_train_bad_setting_exits_2(tmp_path, capsys):
    assert main(["train", "lstm-classifier", "--epochs", "0", "--out", str(tmp_path / "x")]) == 2
    assert "seqfuse train: epochs must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_models_lists_the_zoo(tmp_path):
    assert sorted(MODELS) == sorted(NAMES)
    r = seqfuse("models", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    listed = [line.split()[0] for line in r.stdout.splitlines() if line and not line[0].isspace()]
    assert listed == NAMES
    assert r.stdout.count("epochs ") == len(NAMES)
