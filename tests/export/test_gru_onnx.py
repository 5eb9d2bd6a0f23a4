"""seqfuse.nn.GRU exports as standard ONNX GRU nodes (linear_before_reset=1, with
sequence_lens) that onnxruntime runs with the eager outputs, at shapes other than the
traced one."""
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import requires_native

from seqfuse.export.onnx_ops import OPSET, TRANSLATIONS
from seqfuse.nn import GRU

pytestmark = requires_native


class Encoder(torch.nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.gru = GRU(11, 13, num_layers=2, bidirectional=True, bias=bias)

    def forward(self, x, lengths):
        y, h = self.gru(x, lengths=lengths)
        return y, h


@pytest.fixture(scope="module", params=[True, False], ids=["bias", "no-bias"])
def session(request, tmp_path_factory):
    torch.manual_seed(0)
    model = Encoder(request.param).eval()
    x, lengths = torch.randn(7, 3, 11), torch.tensor([7, 2, 5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model, (x, lengths), dynamo=True, opset_version=OPSET,
            custom_translation_table=TRANSLATIONS, input_names=["x", "lengths"],
            output_names=["y", "h_n"],
            dynamic_shapes=({0: torch.export.Dim("T", max=1024), 1: torch.export.Dim("B", max=1024)},
                            {0: torch.export.Dim("B", max=1024)}))
    path = tmp_path_factory.mktemp("gru") / "gru.onnx"
    prog.save(str(path), external_data=False)
    return model, path


def test_standard_gru_nodes(session):
    _, path = session
    proto = onnx.load(str(path))
    gru = [n for n in proto.graph.node if n.op_type == "GRU"]
    assert len(gru) == 2
    for n in gru:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["linear_before_reset"] == 1
        assert attrs["direction"] == b"bidirectional"
        assert n.input[4], "sequence_lens must be wired"
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)


@pytest.mark.parametrize("T,lengths", [(7, [7, 2, 5]), (1, [1]), (12, [12, 1, 9, 4, 3]), (5, [5, 5])])
def test_onnxruntime_matches_eager(session, T, lengths):
    model, path = session
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    lengths = torch.tensor(lengths)
    x = torch.randn(T, len(lengths), 11)
    with torch.no_grad():
        y, h = model(x, lengths)
    y_o, h_o = sess.run(None, {"x": x.numpy(), "lengths": lengths.numpy()})
    np.testing.assert_allclose(y_o, y.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(h_o, h.numpy(), atol=1e-5, rtol=0)
