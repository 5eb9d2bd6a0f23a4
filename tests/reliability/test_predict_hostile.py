"""Hostile input to the `seqfuse predict` command line: bad paths and files, raw dense
inputs with NaN or the wrong shape. What a case expects: hostile_common.py.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from .hostile_common import (
    NATIVE_KERNELS,
    _cli,
    check_cli_bad_arguments,
    check_cli_process_exits_cleanly,
)

pytestmark = NATIVE_KERNELS


# =====================================================================================
# The command line: exit status 2 (1 where documented), one line on stderr naming the
# argument, never a traceback
# =====================================================================================

CLI_BAD = [  # (argv with {file}, {dir}, {tmp} placeholders, exit status, stderr pattern)
    (["predict", "{tmp}/nope", "x"], 2, r"seqfuse predict: .*nope"),
    (["predict", "{file}", "x"], 2, r"seqfuse predict: .*a-file"),
    (["predict", "{dir}", "x"], 2, r"seqfuse predict: .*empty-dir .*manifest.json"),
    (["predict", "{dir}"], 2, r"seqfuse predict: give inputs"),
    (["predict", "{dir}", "--file", "{tmp}/missing.txt"], 2, r"seqfuse predict: --file: .*missing.txt"),
    (["predict", "{dir}", "--file", "{dir}"], 2, r"seqfuse predict: --file: .*empty-dir"),
    (["predict", "{dir}", "--file", "{tmp}/empty.txt"], 2, r"seqfuse predict: give inputs"),
    (["predict", "{dir}", "--file", "{tmp}/binary.bin"], 2, r"seqfuse predict: --file: .*binary.bin is not UTF-8 text"),
]


@pytest.mark.parametrize("argv,status,pattern", CLI_BAD, ids=[" ".join(a) for a, _, _ in CLI_BAD])
def test_cli_bad_arguments(argv, status, pattern, paths, capsys):
    check_cli_bad_arguments(argv, status, pattern, paths, capsys)


def _dense_inputs(tmp):
    good = np.zeros((30, 5), np.float32)
    nan, inf = good.copy(), good.copy()
    nan[3, 2], inf[0, 0] = np.nan, np.inf
    np.save(tmp / "inf.npy", inf)
    np.save(tmp / "good.npy", good)
    return {"nan-json": json.dumps(nan.tolist()), "inf-npy": str(tmp / "inf.npy"),
            "good": str(tmp / "good.npy")}


@pytest.mark.parametrize("what,pattern", [
    ("nan-json", r"contains NaN or infinity"),
    ("inf-npy", r"contains NaN or infinity"),
    ("wrong-shape", r"expected shape \[30, 5\]"),
    ("not-an-array", r"expected a .npy file or a JSON array"),
    ("batch-size-0", r"batch_size must be >= 1, got 0"),
    ("batch-size-negative", r"batch_size must be >= 1, got -3"),
])
def test_cli_predict_bad_dense_input(what, pattern, dense_artifact, tmp_path, capsys):
    _, art = dense_artifact
    inputs = _dense_inputs(tmp_path)
    item = {"wrong-shape": "[[1, 2], [3, 4]]", "not-an-array": "hello"}.get(what) or inputs.get(what)
    extra = {"batch-size-0": ["--batch-size", "0"], "batch-size-negative": ["--batch-size", "-3"]}.get(what, [])
    rc, out, err = _cli(capsys, "predict", art, item or inputs["good"], *extra)
    assert rc == 2 and re.search(pattern, err) and "Traceback" not in err and out == "", (rc, err)
    rc, out, err = _cli(capsys, "predict", art, inputs["good"], "--json")  # and the artifact is fine
    assert rc == 0 and len(json.loads(out)) == 1, err


@pytest.mark.parametrize("argv,pattern", [
    (["predict", "{dir}", "--file", "{file}.bin"], r"--file: .* is not UTF-8 text"),
])
def test_cli_process_exits_cleanly(argv, pattern, paths):
    """The real entry point: status 2, the message, no traceback from the interpreter."""
    check_cli_process_exits_cleanly(argv, pattern, paths)
