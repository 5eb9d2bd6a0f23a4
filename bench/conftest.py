import tempfile
import warnings
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

import seqfuse  # noqa: F401

THREADS = 2


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


class OutputOnly(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


def onnx_session(fused, x):
    """onnxruntime session (THREADS intra-op threads) on `fused`'s output, exported with
    seqfuse's translations."""
    from seqfuse.export.onnx_ops import OPSET, TRANSLATIONS

    path = Path(tempfile.mkdtemp()) / "rnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(OutputOnly(fused).eval(), (x,), dynamo=True, opset_version=OPSET,
                                 custom_translation_table=TRANSLATIONS, input_names=["x"],
                                 output_names=["y"], verbose=False)
    prog.save(str(path), external_data=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def shape_id(shape) -> str:
    B, T, H, bi = shape
    return f"B{B}-T{T}-H{H}-{'bi' if bi else 'uni'}"


def bench_inference(benchmark, family: str, impl: str, eager, fused, x) -> None:
    """Times one inference implementation of a padded [T, B, H] input in the group
    `{family}-inference-{shape}`, after checking it gives eager's answer (same work)."""
    T, B, H = x.shape
    shape = shape_id((B, T, H, eager.bidirectional))
    benchmark.group = f"{family}-inference-{shape}"
    benchmark.extra_info.update(impl=impl, shape=shape, threads=THREADS)
    if impl == "onnxruntime":
        sess = onnx_session(fused, x)
        feeds = {"x": x.numpy()}
        y = torch.from_numpy(sess.run(None, feeds)[0])
        fn = lambda: sess.run(None, feeds)  # noqa: E731
    else:
        model = eager if impl == "eager" else fused
        with torch.inference_mode():
            y = model(x)[0]

        def fn():
            with torch.inference_mode():
                return model(x)
    with torch.inference_mode():
        torch.testing.assert_close(y, eager(x)[0], atol=1e-5, rtol=0)
    benchmark.pedantic(fn, rounds=max(5, 400 // B), warmup_rounds=3, iterations=1)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["threads"] = torch.get_num_threads()
