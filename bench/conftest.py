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


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["threads"] = torch.get_num_threads()
