"""Shared set-up of the latency suite (bench/): thread settings, the --quick mode, the
extra_info every benchmark records, device handling and the onnxruntime sessions.

    make bench                                   # the full suite, report and plots
    seqfuse bench --only recurrent,zoo --report DIR
    pytest bench --quick --benchmark-disable     # CI: tiny shapes, every benchmark runs once

Every benchmark is placed in a group (benchmark.group) that times one piece of work in
several implementations, and records through `record()`: impl, the group's baseline impl
(eager PyTorch unless it says otherwise), the shape, device, thread count, versions, the
sequences per call (throughput) and, for sweeps, its series and position (the plots).
"""
import functools
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import seqfuse
from seqfuse.backend import triton_unavailable_reason

THREADS = 2


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False,
                     help="tiny shapes, to check that every benchmark still runs (use with "
                          "--benchmark-disable; times are meaningless)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cases(full, quick, ids=None): parametrize `case` with the "
                                       "full list, or the quick one under --quick")


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("cases")
    if marker is not None:
        quick = metafunc.config.getoption("--quick")
        values = marker.kwargs["quick"] if quick else marker.kwargs["full"]
        metafunc.parametrize("case", values, ids=marker.kwargs.get("ids"))


def cases(full, quick, ids=None):
    """Parametrize a benchmark's `case` argument with `full`, or `quick` under --quick."""
    return pytest.mark.cases(full=full, quick=quick, ids=ids)


@pytest.fixture
def quick(request) -> bool:
    return request.config.getoption("--quick")


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@functools.cache
def versions() -> dict:
    return {"torch": torch.__version__, "onnxruntime": ort.__version__,
            "seqfuse": getattr(seqfuse, "__version__", "dev"), "numpy": np.__version__}


def record(benchmark, group: str, impl: str, shape: str, *, batch: int | None = None,
           device: str = "cpu", baseline: str = "eager", **extra) -> None:
    """Name the benchmark's group and record what it timed (see the module docstring)."""
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, baseline=baseline, shape=shape, device=device,
                                threads=THREADS if device == "cpu" else None, versions=versions())
    if batch is not None:
        benchmark.extra_info["batch"] = batch
    benchmark.extra_info.update(extra)


def sweep(series: str, axis: str, value: int) -> dict:
    """extra_info of one point of a sweep (latency against `axis` in the plots)."""
    return {"sweep": {"series": series, "axis": axis, "value": value}}


def require_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def require_backend(impl: str, op: str, device: str) -> str:
    """The seqfuse backend an impl runs on ("native" or "triton"), or a skip saying why it
    cannot run here."""
    require_device(device)
    if impl.endswith("triton"):
        reason = triton_unavailable_reason(device)
        if reason or device != "cuda":
            pytest.skip(reason or "Triton kernels are timed on a GPU only (on CPU they run in "
                                  "the interpreter)")
        return "triton"
    if not seqfuse.ops.has_native_kernel(op, device):
        pytest.skip(seqfuse.ops.build_hint(device))
    return "native"


def ort_providers(impl: str) -> list[str]:
    """onnxruntime execution providers of an impl, or a skip."""
    if impl.endswith("-cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_session(path, impl: str = "onnxruntime") -> ort.InferenceSession:
    """A session with THREADS intra-op threads and one inter-op thread, as torch's."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=ort_providers(impl))


def timed(benchmark, fn, rounds: int, device: str = "cpu", warmup: int = 2) -> None:
    """One call per round; on a GPU each round ends with a synchronize (device time)."""
    if device == "cuda":
        def run():
            out = fn()
            torch.cuda.synchronize()
            return out
    else:
        run = fn
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)


def rounds_for(seconds_per_call: float, budget: float = 1.5, lo: int = 5, hi: int = 200) -> int:
    """Rounds that fit in about `budget` seconds, within [lo, hi]."""
    return int(min(hi, max(lo, budget / max(seconds_per_call, 1e-6))))


class OutputOnly(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


def onnx_session(fused, x, impl: str = "onnxruntime"):
    """onnxruntime session on `fused`'s output, exported with seqfuse's translations."""
    from seqfuse.export.onnx_ops import OPSET, TRANSLATIONS

    path = Path(tempfile.mkdtemp()) / "rnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(OutputOnly(fused).eval(), (x,), dynamo=True, opset_version=OPSET,
                                 custom_translation_table=TRANSLATIONS, input_names=["x"],
                                 output_names=["y"], verbose=False)
    prog.save(str(path), external_data=False)
    return ort_session(path, impl)


def shape_id(shape) -> str:
    B, T, H, bi = shape
    return f"B{B}-T{T}-H{H}-{'bi' if bi else 'uni'}"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(versions())
    machine_info["threads"] = THREADS
    machine_info["cpu_capability"] = seqfuse.cpu_capability()  # the CPU kernels' ISA
    machine_info["quick"] = config.getoption("--quick")
    try:
        from seqfuse.benchmark import machine_id
        machine_info["machine_id"] = machine_id()
    except ImportError:
        pass
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
    machine_info["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
