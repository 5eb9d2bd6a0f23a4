"""seqfuse.nn.LSTM / GRU / RNN export as standard ONNX LSTM, GRU (linear_before_reset=1)
and RNN nodes with sequence_lens, which onnxruntime runs with the eager outputs at shapes
other than the traced one."""
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import requires_native

from seqfuse.export.onnx_ops import OPSET, TRANSLATIONS
from seqfuse.nn import GRU, LSTM, RNN

pytestmark = requires_native

# name -> (module factory, ONNX node type, expected node attributes)
KINDS = {
    "gru": (lambda: GRU(11, 13, num_layers=2, bidirectional=True), "GRU", {"linear_before_reset": 1}),
    "gru-no-bias": (lambda: GRU(11, 13, num_layers=2, bidirectional=True, bias=False), "GRU",
                    {"linear_before_reset": 1}),
    "rnn-tanh": (lambda: RNN(11, 13, num_layers=2, bidirectional=True), "RNN",
                 {"activations": [b"Tanh", b"Tanh"]}),
    "rnn-relu": (lambda: RNN(11, 13, num_layers=2, nonlinearity="relu", bidirectional=True), "RNN",
                 {"activations": [b"Relu", b"Relu"]}),
    "rnn-uni-no-bias": (lambda: RNN(11, 13, bias=False), "RNN", {"activations": [b"Tanh"]}),
    "lstm": (lambda: LSTM(11, 13, num_layers=2, bidirectional=True), "LSTM", {}),
}


class Encoder(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.rnn = layer

    def forward(self, x, lengths):
        y, h = self.rnn(x, lengths=lengths)
        return y, (h[0] if isinstance(h, tuple) else h)


@pytest.fixture(scope="module", params=list(KINDS))
def session(request, tmp_path_factory):
    torch.manual_seed(0)
    make, node_type, attrs = KINDS[request.param]
    model = Encoder(make()).eval()
    x, lengths = torch.randn(7, 3, 11), torch.tensor([7, 2, 5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model, (x, lengths), dynamo=True, opset_version=OPSET,
            custom_translation_table=TRANSLATIONS, input_names=["x", "lengths"],
            output_names=["y", "h_n"],
            dynamic_shapes=({0: torch.export.Dim("T", max=1024), 1: torch.export.Dim("B", max=1024)},
                            {0: torch.export.Dim("B", max=1024)}))
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    prog.save(str(path), external_data=False)
    return model, path, node_type, attrs


def test_standard_recurrent_nodes(session):
    model, path, node_type, expected = session
    proto = onnx.load(str(path))
    nodes = [n for n in proto.graph.node if n.op_type == node_type]
    assert len(nodes) == model.rnn.num_layers
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        for key, value in expected.items():
            assert attrs[key] == value, key
        assert attrs["direction"] == (b"bidirectional" if model.rnn.bidirectional else b"forward")
        assert n.input[4], "sequence_lens must be wired"
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)


@pytest.mark.parametrize("T,lengths", [(7, [7, 2, 5]), (1, [1]), (12, [12, 1, 9, 4, 3]), (5, [5, 5])])
def test_onnxruntime_matches_eager(session, T, lengths):
    model, path, _, _ = session
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    lengths = torch.tensor(lengths)
    x = torch.randn(T, len(lengths), 11)
    with torch.no_grad():
        y, h = model(x, lengths)
    y_o, h_o = sess.run(None, {"x": x.numpy(), "lengths": lengths.numpy()})
    np.testing.assert_allclose(y_o, y.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(h_o, h.numpy(), atol=1e-5, rtol=0)
