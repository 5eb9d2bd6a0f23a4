"""Hostile input to the `seqfuse export` command line. What a case expects:
hostile_common.py.
"""
from __future__ import annotations

import re

import pytest

from .hostile_common import NATIVE_KERNELS, _cli, check_cli_bad_arguments, check_cli_process_exits_cleanly

pytestmark = NATIVE_KERNELS


# =====================================================================================
# The command line: exit status 2 (1 where documented), one line on stderr naming the
# argument, never a traceback
# =====================================================================================

CLI_BAD = [  # (argv with {file}, {dir}, {tmp} placeholders, exit status, stderr pattern)
    (["export", "{tmp}/nope", "--out", "{tmp}/x"], 2, r"seqfuse export: checkpoint folder .*nope does not exist"),
    (["export", "{dir}", "--out", "{tmp}/x"], 2, r"seqfuse export: checkpoint folder .*empty-dir has no config.json"),
    (["export", "{tmp}/nope", "--out", "{file}"], 2, r"seqfuse export: --out: .*a-file exists and is not a folder"),
    (["export", "{tmp}/nope", "--out", "{tmp}/x", "--formats", "nope"], 2, r"--formats: unknown \['nope'\]"),
    (["export", "{tmp}/nope", "--out", "{tmp}/x", "--formats", ","], 2, r"--formats: unknown"),
    (["export", "{tmp}/nope"], 2, r"the following arguments are required: --out"),
    (["export", "{tmp}/nope", "--out", "{file}/x"], 2, r"seqfuse export: --out: .*a-file/x cannot be created: "
                                                       r".*a-file is not a folder"),
    (["export", "{tmp}/nope", "--out", "{tmp}/x", "--triton-repo", "{file}"], 2,
     r"seqfuse export: --triton-repo: .*a-file exists and is not a folder"),
    (["export", "{tmp}/nope", "--out", "{tmp}/x", "--atol", "inf"], 2, r"--atol must be a finite number > 0, got inf"),
]


@pytest.mark.parametrize("argv,status,pattern", CLI_BAD, ids=[" ".join(a) for a, _, _ in CLI_BAD])
def test_cli_bad_arguments(argv, status, pattern, paths, capsys):
    check_cli_bad_arguments(argv, status, pattern, paths, capsys)


def test_cli_export_bad_numbers(dense_artifact, tmp_path, capsys):
    ckpt, _ = dense_artifact
    for argv, pattern in ((["--opset", "5"], r"opset must be an integer in \[18, 23\], got 5"),
                          (["--atol", "nan"], r"--atol must be a finite number > 0, got nan"),
                          (["--atol", "inf"], r"--atol must be a finite number > 0, got inf"),
                          (["--atol=-inf"], r"--atol must be a finite number > 0, got -inf"),
                          (["--atol", "0"], r"--atol must be a finite number > 0, got 0"),
                          (["--atol", "-1"], r"--atol must be a finite number > 0, got -1")):
        rc, out, err = _cli(capsys, "export", ckpt, "--out", tmp_path / "x", *argv)
        assert rc == 2 and re.search(pattern, err) and "Traceback" not in err, (argv, rc, err)
        assert not (tmp_path / "x").exists()


def test_export_model_refuses_a_tolerance_that_disables_parity(dense_artifact, tmp_path):
    """The library's own check (the command line's is above): inf would pass any difference."""
    import math

    from seqfuse.zoo.export import export_checkpoint

    ckpt, _ = dense_artifact
    for atol in (math.inf, math.nan, -1e-5, 0, True):
        with pytest.raises(ValueError, match=rf"atol must be a finite number > 0, got {atol!r}"):
            export_checkpoint(ckpt, tmp_path / "x", formats=("onnx",), use_data=False, atol=atol)
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv,pattern", [
    (["export", "{tmp}/nope", "--out", ".", "--force"], r"--out: \. is the current folder or one of its parents"),
    (["export", "{tmp}/nope", "--out", "{tmp}", "--force"], r"--out: .* is the current folder or one of its parents"),
])
def test_cli_process_exits_cleanly(argv, pattern, paths):
    """The real entry point, run in the {tmp} folder: status 2, the message, no traceback."""
    check_cli_process_exits_cleanly(argv, pattern, paths)
    assert (paths / "a-file").read_text() == "not a folder\n"
