"""Hostile input to the rest of the `seqfuse` command line: the subcommands that are no
entry point of their own (bench, models, demo) and unknown commands. The command line of train,
evaluate, export and predict: test_{train,export,predict}_hostile.py. What a case expects:
hostile_common.py.
"""
from __future__ import annotations

import pytest

from .hostile_common import NATIVE_KERNELS, check_cli_bad_arguments

pytestmark = NATIVE_KERNELS


# =====================================================================================
# The command line: exit status 2 (1 where documented), one line on stderr naming the
# argument, never a traceback
# =====================================================================================

CLI_BAD = [  # (argv with {file}, {dir}, {tmp} placeholders, exit status, stderr pattern)
    (["bench", "--threshold", "nan"], 2, r"seqfuse bench: --threshold must be > 0"),
    (["bench", "--threshold", "0"], 2, r"seqfuse bench: --threshold must be > 0"),
    (["bench", "--only", "nope"], 2, r"seqfuse bench: unknown suite \['nope'\]"),
    (["bench", "--from-json", "{tmp}/nope.json"], 2, r"seqfuse bench: .*nope.json"),
    (["bench", "--from-json", "{dir}"], 2, r"seqfuse bench: .*empty-dir"),
    (["demo", "--out", "{file}"], 2, r"seqfuse demo: .*a-file/checkpoint cannot be created: .*a-file is not a "
                                     r"folder; give another --out"),
    (["models", "extra"], 2, r"unrecognized arguments: extra"),
    (["no-such-command"], 2, r"invalid choice: 'no-such-command'"),
]


@pytest.mark.parametrize("argv,status,pattern", CLI_BAD, ids=[" ".join(a) for a, _, _ in CLI_BAD])
def test_cli_bad_arguments(argv, status, pattern, paths, capsys):
    check_cli_bad_arguments(argv, status, pattern, paths, capsys)
