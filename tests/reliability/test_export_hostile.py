"""Hostile input to the `seqfuse export` command line. What a case expects:
hostile_common.py.
"""
from __future__ import annotations

import re

import pytest

from .hostile_common import NATIVE_KERNELS, _cli, check_cli_bad_arguments

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
]


@pytest.mark.parametrize("argv,status,pattern", CLI_BAD, ids=[" ".join(a) for a, _, _ in CLI_BAD])
def test_cli_bad_arguments(argv, status, pattern, paths, capsys):
    check_cli_bad_arguments(argv, status, pattern, paths, capsys)


def test_cli_export_bad_numbers(dense_artifact, tmp_path, capsys):
    ckpt, _ = dense_artifact
    for argv, pattern in ((["--opset", "5"], r"opset must be an integer in \[18, 23\], got 5"),
                          (["--atol", "nan"], r"atol must be > 0, got nan"),
                          (["--atol", "-1"], r"atol must be > 0")):
        rc, out, err = _cli(capsys, "export", ckpt, "--out", tmp_path / "x", *argv)
        assert rc == 2 and re.search(pattern, err) and "Traceback" not in err, (argv, rc, err)
        assert not (tmp_path / "x").exists()
