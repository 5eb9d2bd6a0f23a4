"""Hypothesis profiles for the property tests, a per-test record of the examples run, and
the fixtures shared by the per-entry-point files (at the end).

Profiles (chosen by the environment variable SEQFUSE_HYPOTHESIS, default "ci"):

  ci    bounded and deterministic: 25 examples per test (tests scale this down where one
        example is slow, e.g. the Triton interpreter), derandomized, no example database,
        so that every CI run draws the same examples
  long  500 examples per test (scaled down the same way), random (a new seed each run),
        failures kept in the example database (.hypothesis/) so a re-run replays them

SEQFUSE_HYPOTHESIS_REPORT=path writes a JSON summary at the end of the session: for each
property test (pytest node id), its outcome, the examples it ran (test cases hypothesis
generated or replayed and ran to the end), every call of its body (shrinking included),
its duration, and for a failure the falsifying example hypothesis printed.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

from .files_common import export, make_checkpoint
from .hostile_common import run_sandbox

PROFILE_ENV = "SEQFUSE_HYPOTHESIS"
REPORT_ENV = "SEQFUSE_HYPOTHESIS_REPORT"

_COMMON = dict(
    deadline=None,          # CPU kernels and the Triton interpreter vary a lot in speed
    print_blob=True,        # a failure prints @reproduce_failure(...) to replay it exactly
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", max_examples=25, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=500, derandomize=False, **_COMMON)
# A fast smoke run while editing the tests (not documented as a CI mode).
settings.register_profile("dev", max_examples=5, derandomize=True, database=None,
                          phases=[Phase.explicit, Phase.generate], **_COMMON)

PROFILE = os.environ.get(PROFILE_ENV, "ci")
if PROFILE not in ("ci", "long", "dev"):
    raise pytest.UsageError(f"{PROFILE_ENV} must be 'ci', 'long' or 'dev', got {PROFILE!r}")
settings.load_profile(PROFILE)

_RECORDS: dict[str, dict] = {}
_EXAMPLE_PHASES = ("explicit-phase", "reuse-phase", "generate-phase")


def _count_cases(stats: dict) -> dict:
    """Test cases per phase and status from hypothesis' statistics dict (its format is not
    a stable API: anything missing is simply left out)."""
    out = {}
    for phase, data in stats.items():
        if isinstance(data, dict) and "test-cases" in data:
            statuses: dict[str, int] = {}
            for case in data["test-cases"]:
                statuses[case.get("status", "?")] = statuses.get(case.get("status", "?"), 0) + 1
            out[phase] = statuses
    return out


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_call(item):
    """Counts the calls of a @given test's body (hypothesis.inner_test is documented as
    replaceable) and keeps hypothesis' own statistics of the run."""
    wrapped = getattr(getattr(item, "obj", None), "hypothesis", None)
    if wrapped is None or not hasattr(wrapped, "inner_test"):
        return (yield)
    record = {"calls": 0, "failing_calls": 0, "phases": {}, "stopped_because": None}
    inner = wrapped.inner_test

    @functools.wraps(inner)
    def counting(*args, **kwargs):
        record["calls"] += 1
        try:
            return inner(*args, **kwargs)
        except BaseException:
            record["failing_calls"] += 1
            raise

    from hypothesis.statistics import collector

    previous = collector.value

    def note(stats):
        record["phases"] = _count_cases(stats)
        record["stopped_because"] = stats.get("stopped-because")
        if previous is not None:
            previous(stats)

    wrapped.inner_test = counting
    start = time.perf_counter()
    try:
        with collector.with_value(note):
            return (yield)
    finally:
        wrapped.inner_test = inner
        record["call_seconds"] = round(time.perf_counter() - start, 3)
        _RECORDS[item.nodeid] = record


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """The outcome of each property test (and the falsifying example of a failure)."""
    report = yield
    if not hasattr(getattr(item, "obj", None), "hypothesis"):
        return report
    final = report.when == "call" or (report.when == "setup" and not report.passed)
    if not final:
        return report
    record = _RECORDS.setdefault(item.nodeid, {"calls": 0, "failing_calls": 0, "phases": {}})
    if hasattr(report, "wasxfail"):
        record["outcome"] = "xfailed" if report.skipped else "xpassed"
        record["xfail_reason"] = report.wasxfail
    elif report.when == "setup" and report.failed:
        record["outcome"] = "error"
    else:
        record["outcome"] = report.outcome
    if report.skipped and isinstance(report.longrepr, tuple):
        record["skip_reason"] = str(report.longrepr[2])
    if report.failed or (hasattr(report, "wasxfail") and report.skipped):
        text = report.longreprtext
        at = text.find("Falsifying example")
        record["falsifying_example"] = text[at:at + 3000] if at >= 0 else text[-3000:]
    return report


def _examples(record: dict) -> int:
    """Examples run to the end (valid or failing) outside the shrink/explain phases; the
    body call count when hypothesis gave no statistics."""
    phases = record.get("phases") or {}
    counted = [sum(n for status, n in phases[p].items() if status in ("valid", "interesting"))
               for p in _EXAMPLE_PHASES if p in phases]
    return sum(counted) if counted else record.get("calls", 0)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get(REPORT_ENV)
    if not path or not _RECORDS:
        return
    tests = {}
    for nodeid, record in sorted(_RECORDS.items()):
        tests[nodeid] = {"outcome": record.get("outcome", "unknown"), "examples": _examples(record),
                         **{k: v for k, v in record.items() if k != "outcome"}}
    outcomes: dict[str, int] = {}
    for t in tests.values():
        outcomes[t["outcome"]] = outcomes.get(t["outcome"], 0) + 1
    summary = {
        "profile": PROFILE,
        "max_examples": settings.default.max_examples,
        "derandomize": settings.default.derandomize,
        "tests": len(tests),
        "examples_total": sum(t["examples"] for t in tests.values()),
        "outcomes": outcomes,
        "results": tests,
    }
    with open(path, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=False)
        f.write("\n")


# -- fixtures shared by the per-entry-point files ---------------------------------------
# (module-scoped ones are built once per test file that asks for them)


@pytest.fixture(scope="module")
def sandbox(request) -> dict[str, dict]:
    """The hostile-input file's CASES, run in child interpreters (hostile_common.run_sandbox):
    case name -> {"ok": ..., "error": ...}."""
    return run_sandbox(request.module)


@pytest.fixture(scope="module")
def dense_artifact(tmp_path_factory):
    """An untrained lstm-regressor checkpoint and its ONNX artifact (no data needed)."""
    from seqfuse.zoo.export import export_checkpoint
    from seqfuse.zoo.models import MODELS
    from seqfuse.zoo.train import save_checkpoint

    root = tmp_path_factory.mktemp("hostile-cli")
    torch.manual_seed(0)
    model = MODELS["lstm-regressor"](num_features=5, hidden_size=4, num_layers=1, dropout=0.0)
    ckpt = save_checkpoint(model, "lstm-regressor", {}, root / "ckpt")
    export_checkpoint(ckpt, root / "art", formats=("onnx",), use_data=False)
    return ckpt, root / "art"


@pytest.fixture
def paths(tmp_path):
    """A folder of things that are not what a command line argument asks for (the hostile
    command-line cases' {file}, {dir}, {tmp})."""
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "a-file.bin").write_bytes(b"\xff\xfe\x00 not text")
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    return tmp_path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoints of the same model with different weights (files_common.py)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return make_checkpoint(root / "ckpt-a", 0), make_checkpoint(root / "ckpt-b", 1)


@pytest.fixture(scope="module")
def artifact(checkpoints, tmp_path_factory):
    """The artifact exported from the first checkpoint."""
    art = tmp_path_factory.mktemp("artifact") / "art"
    export(checkpoints[0], art)
    return art


@pytest.fixture
def ckpt(checkpoints, tmp_path):
    return Path(shutil.copytree(checkpoints[0], tmp_path / "ckpt"))


@pytest.fixture
def art(artifact, tmp_path):
    return Path(shutil.copytree(artifact, tmp_path / "art"))
