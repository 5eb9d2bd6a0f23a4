"""Shared by the hostile-input tests, one file per entry point:

  test_ops_hostile.py      the compiled ops called directly (torch.ops.seqfuse.*), their
                           wrappers (seqfuse.ops) and the functional forms on the native and
                           reference backends
  test_modules_hostile.py  the seqfuse.nn modules
  test_train_hostile.py    the zoo models that `seqfuse train` builds (seqfuse.zoo.models),
                           and the `seqfuse train` / `seqfuse evaluate` command line
  test_export_hostile.py   the `seqfuse export` command line
  test_predict_hostile.py  the `seqfuse predict` command line
  test_cli_hostile.py      the rest of the `seqfuse` command line (bench, models, unknown
                           commands)

Each hostile case expects either a clear exception (a given type, its message naming the
offending argument) or a defined result (what eager PyTorch gives, an empty result for an
empty batch, the same result as the contiguous copy of a strided or overlapping input),
never a crash, a hang or garbage.

The cases that could crash the interpreter (raw op calls with bad arguments, empty and
huge sizes, meta tensors) run in child interpreters: a file's table of such cases (its
CASES, built with case_table) goes to the `sandbox` fixture (conftest.py, run_sandbox
here), which runs the whole table in one child, restarting it after the case that killed
it (a signal, or a hang past its time limit), so a crash fails that one case. The
numerical edge cases (huge scores, fully masked rows, saturated gates, NaN and inf) and
the command line run in process.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest
import torch

from seqfuse import ops

NATIVE = ops.has_native_kernel("lstm_layer", "cpu")
# The hostile files' pytestmark.
NATIVE_KERNELS = pytest.mark.skipif(not NATIVE, reason="seqfuse._C was not built with CPU kernels")

ALLOC = r"can't allocate memory|out of memory|not enough memory"  # the allocator refusing


# A file's sandboxed cases: name -> a zero-argument check, run in the sandbox (an
# AssertionError or an unexpected exception fails it).
def case_table() -> tuple[dict[str, Callable[[], None]], Callable[[str, Callable[[], None]], None]]:
    """(CASES, case): an empty table and the function that adds a named check to it."""
    cases: dict[str, Callable[[], None]] = {}

    def case(name: str, fn: Callable[[], None]) -> None:
        assert name not in cases, name
        cases[name] = fn
    return cases, case


def raising(exc, pattern: str, call: Callable[[], object]) -> Callable[[], None]:
    def check():
        with pytest.raises(exc, match=pattern):
            call()
    return check


def _close(got, want, atol=1e-5, rtol=1e-5):
    """Equal within tolerance, NaN where `want` has NaN, same shapes."""
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want), (len(got), len(want))
    for g, w in zip(got, want):
        assert g.shape == w.shape, (tuple(g.shape), tuple(w.shape))
        assert g.dtype == w.dtype, (g.dtype, w.dtype)
        if g.device.type == "meta":
            continue
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, equal_nan=True)


def _r(*shape, dtype=torch.float32, scale=1.0):
    return torch.randn(*shape, dtype=dtype) * scale


# =====================================================================================
# The sandbox: a file's cases in a child interpreter
# =====================================================================================

CASE_TIMEOUT = 15    # seconds for one case: past it the child dumps its stacks and exits
CHILD_TIMEOUT = 300  # seconds for one child run, in case even that fails


def run_child(cases: dict[str, Callable[[], None]], start: int) -> None:
    """The child's side: runs `cases` from index `start`, one result line per case."""
    import faulthandler

    warnings.filterwarnings("ignore")
    names = list(cases)
    for i in range(start, len(names)):
        print(f"@@START {i}", flush=True)
        torch.manual_seed(0)
        faulthandler.dump_traceback_later(CASE_TIMEOUT, exit=True)
        try:
            cases[names[i]]()
            result = {"ok": True}
        except BaseException as exc:  # noqa: BLE001  (pytest's Failed is a BaseException)
            text = str(exc).strip()
            result = {"ok": False, "error": f"{type(exc).__name__}: {text[:3000]}"}
        faulthandler.cancel_dump_traceback_later()
        print(f"@@DONE {i} {json.dumps(result)}", flush=True)


def run_sandbox(module: ModuleType) -> dict[str, dict]:
    """The parent's side: runs module.CASES in `python -m <module> START` (whose __main__
    calls run_child), from the folder the module's package is imported from, restarting
    after the case that killed the child. name -> {"ok": ..., "error": ...}."""
    names = list(module.CASES)
    root = Path(module.__file__).resolve().parents[module.__name__.count(".")]
    results: dict[str, dict] = {}
    start = 0
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    while start < len(names):
        try:
            proc = subprocess.run([sys.executable, "-m", module.__name__, str(start)],
                                  capture_output=True, text=True, timeout=CHILD_TIMEOUT, env=env,
                                  cwd=root)
            out, err, how = proc.stdout, proc.stderr, f"exited with status {proc.returncode}"
        except subprocess.TimeoutExpired as exc:
            decode = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
            out, err, how = decode(exc.stdout), decode(exc.stderr), f"hung (killed after {CHILD_TIMEOUT} s)"
        started = None
        for line in out.splitlines():
            if line.startswith("@@START "):
                started = int(line.split()[1])
            elif line.startswith("@@DONE "):
                _, i, payload = line.split(" ", 2)
                results[names[int(i)]] = json.loads(payload)
                started = None
        if len(results) == len(names):
            break
        tail = "\n".join(err.strip().splitlines()[-15:])
        if started is None:  # died outside any case (at start-up): nothing more to learn
            for n in names[start:]:
                results.setdefault(n, {"ok": False, "error": f"the child interpreter {how}:\n{tail}"})
            break
        results[names[started]] = {"ok": False, "error": f"the interpreter {how} in this case:\n{tail}"}
        start = started + 1
    return results


# =====================================================================================
# Numerical edge cases against eager PyTorch
# =====================================================================================

def _finite_where(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 1e-5) -> None:
    """Wherever eager PyTorch is finite, seqfuse is finite and equal; NaN where it is NaN."""
    finite = want.isfinite()
    assert got[finite].isfinite().all(), "seqfuse gives NaN/inf where eager PyTorch is finite"
    torch.testing.assert_close(got[finite], want[finite], atol=atol, rtol=rtol)
    assert torch.equal(got.isnan(), want.isnan()), (
        f"NaN at other positions than eager PyTorch: {int(got.isnan().sum())} vs {int(want.isnan().sum())}")


# =====================================================================================
# The command line: exit status 2 (1 where documented), one line on stderr naming the
# argument, never a traceback
# =====================================================================================

def _cli(capsys, *argv) -> tuple[int, str, str]:
    from seqfuse.cli import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def _fill(argv, tmp):
    return [a.format(file=tmp / "a-file", dir=tmp / "empty-dir", tmp=tmp) for a in argv]


def check_cli_bad_arguments(argv, status, pattern, paths, capsys):
    """The body of each file's test_cli_bad_arguments (its CLI_BAD rows: argv with {file},
    {dir}, {tmp} placeholders, exit status, stderr pattern; `paths`: conftest.py's)."""
    rc, out, err = _cli(capsys, *_fill(argv, paths))
    assert rc == status, (rc, out, err)
    assert re.search(pattern, err), err
    assert "Traceback" not in err and out == ""
    if "usage:" not in err:  # argparse's own errors come with the usage line
        assert len(err.strip().splitlines()) == 1, err
    assert (paths / "a-file").read_text() == "not a folder\n"  # a file given as --out is left alone


def check_cli_process_exits_cleanly(argv, pattern, paths):
    """The body of test_cli_process_exits_cleanly: the real entry point gives status 2, the
    message, no traceback from the interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-m", "seqfuse.cli", *_fill(argv, paths)], capture_output=True,
                       text=True, timeout=120, env=env, cwd=paths)
    assert r.returncode == 2, r.stderr
    assert re.search(pattern, r.stderr) and "Traceback" not in r.stderr, r.stderr
