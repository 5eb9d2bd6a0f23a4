"""Hostile input to what `seqfuse train` builds and runs: the zoo models
(seqfuse.zoo.models), and the `seqfuse train` and `seqfuse evaluate` command line. What a
case expects and how the sandbox runs them: hostile_common.py.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch

from seqfuse.zoo.models import MODELS

from .hostile_common import (
    ALLOC,
    NATIVE_KERNELS,
    _finite_where,
    _r,
    case_table,
    check_cli_bad_arguments,
    check_cli_process_exits_cleanly,
    raising,
    run_child,
)

pytestmark = NATIVE_KERNELS

CASES, case = case_table()


# =====================================================================================
# Zoo models
# =====================================================================================

ZOO_V, ZOO_TGT_V = 13, 11
# Tiny configs, a copy of tests/conftest.py's ZOO_CONFIGS: this file also runs as the
# sandbox's child interpreter, outside pytest, where that conftest is not loaded.
ZOO = {
    "lstm-classifier": dict(vocab_size=ZOO_V, embed_dim=7, hidden_size=9, num_classes=3, num_layers=2,
                            bidirectional=True),
    "bilstm-classifier": dict(vocab_size=ZOO_V, embed_dim=7, hidden_size=9, num_classes=3),
    "bilstm-attention": dict(vocab_size=ZOO_V, embed_dim=7, hidden_size=9, num_classes=3, attention_size=5),
    "bigru-classifier": dict(vocab_size=ZOO_V, embed_dim=7, hidden_size=9, num_classes=3),
    "transformer-classifier": dict(vocab_size=ZOO_V, d_model=12, num_classes=3, nhead=3, num_layers=2,
                                   dim_feedforward=13, max_len=16, dropout=0.0),
    "lstm-tagger": dict(vocab_size=ZOO_V, embed_dim=7, hidden_size=9, num_tags=5),
}
DENSE = {"lstm-rows": (dict(hidden_size=9, num_classes=3, rows=7, cols=5), "images"),
         "lstm-regressor": (dict(num_features=5, hidden_size=9, num_layers=2, dropout=0.0), "x")}


def _model(name, cfg, backend="auto"):
    torch.manual_seed(0)
    return MODELS[name](**cfg, backend=backend).eval()


ids = lambda *rows: torch.tensor(rows)  # noqa: E731
for name, cfg in ZOO.items():
    m = lambda name=name, cfg=cfg: _model(name, cfg)  # noqa: E731
    vocab = rf"input_ids must be token ids in \[0, vocab_size={ZOO_V}\)"
    case(f"{name}/token-past-vocab", raising(ValueError, vocab, lambda m=m: m()(ids([1, 2, ZOO_V]))))
    case(f"{name}/token-negative", raising(ValueError, vocab, lambda m=m: m()(ids([1, -1, 2]))))
    case(f"{name}/batch-0", raising(ValueError, r"input_ids must have at least one row and one token",
                                    lambda m=m: m()(torch.zeros(0, 3, dtype=torch.long))))
    case(f"{name}/tokens-0", raising(ValueError, r"input_ids must have at least one row and one token",
                                     lambda m=m: m()(torch.zeros(2, 0, dtype=torch.long))))
    case(f"{name}/ids-float", raising(TypeError, r"input_ids must hold integer token ids",
                                      lambda m=m: m()(torch.ones(2, 3))))
    case(f"{name}/ids-3d", raising(ValueError, r"input_ids must be a \[B, T\] tensor",
                                   lambda m=m: m()(torch.ones(2, 3, 1, dtype=torch.long))))
    case(f"{name}/lengths-past-T", raising(ValueError, r"lengths must be in \[1, T=3\]",
                                           lambda m=m: m()(ids([1, 2, 3], [4, 5, 0]), torch.tensor([3, 4]))))
    case(f"{name}/lengths-meta", raising(ValueError, r"lengths is a meta tensor .*input_ids is on cpu",
                                         lambda m=m: m()(ids([1, 2, 3], [4, 5, 0]), torch.tensor([3, 2], device="meta"))))
    case(f"{name}/lengths-float", raising(TypeError, r"lengths must be an int64 tensor",
                                          lambda m=m: m()(ids([1, 2, 3], [4, 5, 0]), torch.tensor([3.0, 2.0]))))

S2S = dict(src_vocab_size=ZOO_V, tgt_vocab_size=ZOO_TGT_V, embed_dim=7, hidden_size=9, attention_size=5,
           max_decode_len=6)
s2s = lambda: _model("seq2seq-attention", S2S)  # noqa: E731
case("seq2seq-attention/src-past-vocab", raising(ValueError, rf"src_ids must be token ids in \[0, vocab_size={ZOO_V}\)",
                                                 lambda: s2s()(ids([1, 99]), None, ids([2, 3]))))
case("seq2seq-attention/tgt-past-vocab", raising(ValueError, rf"tgt_in must be token ids in \[0, vocab_size={ZOO_TGT_V}\)",
                                                 lambda: s2s()(ids([1, 5]), None, ids([2, ZOO_TGT_V]))))
case("seq2seq-attention/tgt-0", raising(ValueError, r"tgt_in must have at least one row and one token",
                                        lambda: s2s()(ids([1, 5]), None, torch.zeros(1, 0, dtype=torch.long))))
case("seq2seq-attention/src-batch-0", raising(ValueError, r"src_ids must have at least one row and one token",
                                              lambda: s2s()(torch.zeros(0, 2, dtype=torch.long), None, ids([2, 3]))))
case("seq2seq-attention/batch-mismatch", raising(ValueError, r"tgt_in must have the batch size of src_ids \(2\), got 3",
                                                 lambda: s2s()(ids([1, 5], [2, 3]), None, ids([2, 3], [2, 3], [2, 3]))))
case("seq2seq-attention/greedy-max_len-0", raising(ValueError, r"max_len must be a positive integer, got 0",
                                                   lambda: s2s().greedy_decode(ids([1, 5]), None, 0)))
case("seq2seq-attention/greedy-max_len-negative", raising(ValueError, r"max_len must be a positive integer, got -1",
                                                          lambda: s2s().greedy_decode(ids([1, 5]), None, -1)))
for name, (cfg, arg) in DENSE.items():
    m = lambda name=name, cfg=cfg: _model(name, cfg)  # noqa: E731
    case(f"{name}/batch-0", raising(ValueError, rf"{arg} must have at least one row and one step",
                                    lambda m=m: m()(torch.zeros(0, 7, 5))))
    case(f"{name}/steps-0", raising(ValueError, rf"{arg} must have at least one row and one step",
                                    lambda m=m: m()(torch.zeros(2, 0, 5))))
    case(f"{name}/int64", raising(TypeError, rf"{arg} must be a floating-point tensor",
                                  lambda m=m: m()(torch.zeros(2, 7, 5, dtype=torch.long))))
    case(f"{name}/features", raising(ValueError, rf"{arg} must be \[B, T, 5\]", lambda m=m: m()(torch.zeros(2, 7, 4))))
    case(f"{name}/batch-time-2^40", raising(RuntimeError, ALLOC, lambda m=m: m()(torch.zeros(1, 1, 5).expand(2**20, 2**20, 5))))


# =====================================================================================
# The sandbox: every case above in a child interpreter
# =====================================================================================

@pytest.mark.parametrize("name", list(CASES))
def test_sandboxed(name, sandbox):
    result = sandbox[name]
    assert result["ok"], result["error"]


# =====================================================================================
# Numerical edge cases against eager PyTorch (in process: nothing here can crash)
# =====================================================================================

@pytest.mark.parametrize("name", ["lstm-rows", "lstm-regressor"])
def test_dense_models_nan_like_eager(name):
    cfg, _ = DENSE[name]
    x = _r(2, 7, 5)
    x[1, 3, 2] = math.nan
    got, want = _model(name, cfg)(x), _model(name, cfg, backend="reference")(x)
    _finite_where(got, want, atol=1e-5)
    assert got[0].isfinite().all() and got[1].isnan().all()


# =====================================================================================
# The command line: exit status 2 (1 where documented), one line on stderr naming the
# argument, never a traceback
# =====================================================================================

CLI_BAD = [  # (argv with {file}, {dir}, {tmp} placeholders, exit status, stderr pattern)
    (["train", "no-such-model"], 2, r"seqfuse train: unknown model 'no-such-model'"),
    (["train", "lstm-regressor", "--epochs", "-1", "--out", "{tmp}/o"], 2, r"epochs must be a positive integer"),
    (["train", "lstm-regressor", "--epochs", "0", "--out", "{tmp}/o"], 2, r"epochs must be a positive integer"),
    (["train", "lstm-regressor", "--batch-size", "0", "--out", "{tmp}/o"], 2, r"batch_size must be a positive integer"),
    (["train", "lstm-regressor", "--lr", "nan", "--out", "{tmp}/o"], 2, r"--lr must be a finite number > 0, got nan"),
    (["train", "lstm-regressor", "--lr", "inf", "--out", "{tmp}/o"], 2, r"--lr must be a finite number > 0, got inf"),
    (["train", "lstm-regressor", "--lr", "-1", "--out", "{tmp}/o"], 2, r"--lr must be a finite number > 0"),
    (["train", "lstm-regressor", "--max-minutes", "nan", "--out", "{tmp}/o"], 2, r"max_minutes must be > 0"),
    (["train", "lstm-regressor", "--max-minutes", "-1", "--out", "{tmp}/o"], 2, r"max_minutes must be > 0"),
    (["train", "lstm-regressor", "--epochs", "abc"], 2, r"argument --epochs: invalid int value"),
    (["train", "lstm-regressor", "--limit", "0", "--out", "{tmp}/o"], 2, r"limit must be >= 1, got 0"),
    (["train", "lstm-regressor", "--backend", "nope", "--out", "{tmp}/o"], 2, r"backend must be one of"),
    (["train", "lstm-regressor", "--device", "nope", "--out", "{tmp}/o"], 2, r"--device must be cpu or cuda\[:N\], got 'nope'"),
    (["train", "lstm-regressor", "--device", "meta", "--out", "{tmp}/o"], 2, r"--device must be cpu or cuda\[:N\], got 'meta'"),
    (["train", "lstm-regressor", "--out", "{file}"], 2, r"--out: .*a-file exists and is not a folder"),
    (["train", "lstm-regressor", "--out", "{file}", "--force"], 2, r"--out: .*a-file exists and is not a folder"),
    (["train", "lstm-regressor", "--out", "{file}/x"], 2, r"--out: .*a-file/x cannot be created: .*a-file is not a folder"),
    (["train", "lstm-regressor", "--out", "{tmp}"], 2, r"--out: .* exists and is not a checkpoint written by "
                                                     r"seqfuse train \(it holds a-file, .*--force"),
    (["evaluate", "{tmp}/nope"], 2, r"seqfuse evaluate: checkpoint folder .*nope does not exist"),
    (["evaluate", "{file}"], 2, r"seqfuse evaluate: .*a-file"),
    (["evaluate", "{dir}"], 2, r"seqfuse evaluate: checkpoint folder .*empty-dir has no config.json"),
    (["evaluate", "{dir}", "--device", "meta"], 2, r"--device must be cpu or cuda\[:N\], got 'meta'"),
    (["evaluate", "{dir}", "--device", "gpu7"], 2, r"--device must be cpu or cuda\[:N\], got 'gpu7'"),
]


@pytest.mark.parametrize("argv,status,pattern", CLI_BAD, ids=[" ".join(a) for a, _, _ in CLI_BAD])
def test_cli_bad_arguments(argv, status, pattern, paths, capsys):
    check_cli_bad_arguments(argv, status, pattern, paths, capsys)


@pytest.mark.parametrize("argv,pattern", [
    (["train", "lstm-regressor", "--device", "meta"], r"--device must be cpu or cuda"),
    (["evaluate", "{dir}", "--device", "nope"], r"--device must be cpu or cuda"),
    (["train", "lstm-regressor", "--out", ".", "--force"], r"--out: \. is the current folder or one of its parents"),
    (["train", "lstm-regressor", "--out", "{tmp}", "--force"], r"--out: .* is the current folder or one of its parents"),
])
def test_cli_process_exits_cleanly(argv, pattern, paths):
    """The real entry point: status 2, the message, no traceback from the interpreter."""
    check_cli_process_exits_cleanly(argv, pattern, paths)


if __name__ == "__main__":  # the sandbox's child: run the cases from index argv[1]
    run_child(CASES, int(sys.argv[1]))
