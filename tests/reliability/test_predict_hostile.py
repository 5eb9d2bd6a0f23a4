"""Hostile input to the `seqfuse predict` command line: bad paths and files, raw dense
inputs with NaN or the wrong shape, a .npy header that lies about its shape or holds a
non-real dtype, JSON nested past the interpreter's recursion limit, an endless --file, and
line separators other than "\n" inside an input line. What a case expects:
hostile_common.py.
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
    (["predict", "{dir}", "--file", "/dev/zero"], 2, r"seqfuse predict: --file: /dev/zero holds more than 64 MiB"),
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


def _npy_with_header(path, header: dict, data: bytes = b"") -> str:
    """A .npy file (format 1.0) whose header says what `header` says, followed by `data`."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(data)
    return str(path)


@pytest.mark.parametrize("what,pattern", [
    ("huge-shape", r"expected shape \[30, 5\], got \[1099511627776, 1048576\]"),
    ("short-data", r"its header gives 600 bytes of data, the file holds 8 \(truncated"),
    ("complex", r"expected real numbers, got dtype complex64"),
    ("object", r"expected real numbers, got dtype object"),
    ("strings-json", r"expected real numbers, got dtype <U"),
    ("nested-json", r"the JSON array nests too deeply"),
])
def test_cli_predict_refuses_a_dense_input_before_reading_it(what, pattern, dense_artifact, tmp_path, capsys):
    _, art = dense_artifact
    f4 = np.dtype("<f4").descr[0][1]
    item = {
        "huge-shape": lambda: _npy_with_header(tmp_path / "huge.npy", {"descr": f4, "fortran_order": False,
                                                                       "shape": (2**40, 2**20)}),
        "short-data": lambda: _npy_with_header(tmp_path / "short.npy", {"descr": f4, "fortran_order": False,
                                                                        "shape": (30, 5)}, b"\0" * 8),
        "complex": lambda: np.save(tmp_path / "c.npy", np.ones((30, 5), np.complex64) * 1j) or str(tmp_path / "c.npy"),
        "object": lambda: np.save(tmp_path / "o.npy", np.full((30, 5), None, object)) or str(tmp_path / "o.npy"),
        "strings-json": lambda: json.dumps([["1"] * 5] * 30),
        "nested-json": lambda: "[" * 100_000 + "]" * 100_000,
    }[what]()
    rc, out, err = _cli(capsys, "predict", art, item)
    assert rc == 2 and re.search(pattern, err) and out == "", (rc, err)
    assert "Traceback" not in err and err.count("\n") == 1, err
    if what != "nested-json":
        assert item[:40] in err, "the message names the input"
    (tmp_path / "lines.txt").write_text(item + "\n")  # the same through --file
    rc, out, err = _cli(capsys, "predict", art, "--file", tmp_path / "lines.txt")
    assert rc == 2 and re.search(pattern, err) and err.count("\n") == 1, (rc, err)


SEPARATORS = ["\x85", "\u2028", "\u2029", "\x1c", "\x1d", "\x1e", "\x0c", "\x0b", "\r"]


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_cli_predict_file_lines_end_at_newline_only(ending, artifact, tmp_path, capsys):
    """str.splitlines() also splits at \\x85, \\u2028, \\x1c, \\x0c... : 5 lines gave 9 rows."""
    lines = [f"w1 w2{sep}w3" for sep in SEPARATORS[:4]] + ["w4 w5"]
    assert sum(len(line.splitlines()) for line in lines) == 9
    path = tmp_path / "inputs.txt"
    path.write_bytes(ending.join(lines + [""]).encode("utf-8"))
    rc, out, err = _cli(capsys, "predict", artifact, "--file", path, "--json")
    assert rc == 0, err
    assert [row["input"] for row in json.loads(out)] == lines
    path.write_bytes("".join(f"w1{sep}w2\n" for sep in SEPARATORS).encode("utf-8"))
    rc, out, err = _cli(capsys, "predict", artifact, "--file", path, "--json")
    assert rc == 0 and len(json.loads(out)) == len(SEPARATORS), err


@pytest.mark.parametrize("argv,pattern", [
    (["predict", "{dir}", "--file", "{file}.bin"], r"--file: .* is not UTF-8 text"),
    (["predict", "{dir}", "--file", "/dev/zero"], r"--file: /dev/zero holds more than 64 MiB"),
])
def test_cli_process_exits_cleanly(argv, pattern, paths):
    """The real entry point: status 2, the message, no traceback from the interpreter."""
    check_cli_process_exits_cleanly(argv, pattern, paths)
