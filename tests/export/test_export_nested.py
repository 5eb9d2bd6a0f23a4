"""export_model with nested inputs (issue 23): `forward(enc_X, dec_X, *args)` as d2l's
EncoderDecoder has it, and a state tuple `forward(x, (h0, c0))`. input_names name the
flattened tensors in order, dynamic_axes is per flattened tensor (a list, or a dict keyed
by name); torch.export's dynamic_shapes mirror the nesting and forward's signature; parity
inputs are drawn per tensor and re-nested. Before, dynamic axes could not be given
("inputs[2] is a tuple, but dynamic_shapes[2] is a dict")."""
import onnx
import pytest
import torch
from conftest import requires_native
from torch import nn
from textbook_models import EncoderDecoder  # d2l's, forward(enc_X, dec_X, *args)

from seqfuse.export import ExportError, ExportSpec, export_model, load_runner

pytestmark = requires_native

TRACE = 6


# -- a small copy of d2l 1.0.3's encoder-decoder classes (d2l/torch.py), GRU encoder and
# a GRU decoder that takes the encoder's state; the decoder's state is a tuple that
# carries enc_valid_lens, passed through EncoderDecoder.forward's *args, as
# d2l's Seq2SeqAttentionDecoder's is (its context here is the mean of the valid encoder
# outputs, not a per-step attention: d2l's attention decoder loops over time in Python).

class Encoder(nn.Module):
    def forward(self, X, *args):
        raise NotImplementedError


class Decoder(nn.Module):
    def init_state(self, enc_all_outputs, *args):
        raise NotImplementedError

    def forward(self, X, state):
        raise NotImplementedError


class Seq2SeqEncoder(Encoder):
    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers, dropout=0):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.GRU(embed_size, num_hiddens, num_layers, dropout=dropout)

    def forward(self, X, *args):
        embs = self.embedding(X.t().type(torch.int64))  # [T, B, E]
        outputs, state = self.rnn(embs)
        return outputs, state


class Seq2SeqDecoder(Decoder):
    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers, dropout=0):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.GRU(embed_size + num_hiddens, num_hiddens, num_layers, dropout=dropout)
        self.dense = nn.Linear(num_hiddens, vocab_size)  # d2l: LazyLinear

    def init_state(self, enc_all_outputs, enc_valid_lens):
        outputs, hidden_state = enc_all_outputs
        return outputs, hidden_state, enc_valid_lens

    def forward(self, X, state):
        enc_outputs, hidden_state, enc_valid_lens = state
        embs = self.embedding(X.t().type(torch.int32))  # [T, B, E]
        valid = torch.arange(enc_outputs.shape[0]).unsqueeze(1) < enc_valid_lens.unsqueeze(0)  # [Ts, B]
        context = (enc_outputs * valid.unsqueeze(-1)).sum(0) / enc_valid_lens.unsqueeze(-1)
        context = context.repeat(embs.shape[0], 1, 1)
        outputs, hidden_state = self.rnn(torch.cat((embs, context), -1), hidden_state)
        outputs = self.dense(outputs).swapaxes(0, 1)  # [B, T, V]
        return outputs, [enc_outputs, hidden_state, enc_valid_lens]


def d2l_model():
    torch.manual_seed(0)
    return EncoderDecoder(Seq2SeqEncoder(11, 5, 6, 2), Seq2SeqDecoder(13, 4, 6, 2)).eval()


def d2l_example():
    enc_X = torch.randint(0, 11, (2, 7))
    dec_X = torch.randint(0, 13, (2, 5))
    return enc_X, dec_X, torch.tensor([7, 3])


D2L_NAMES = ["enc_X", "dec_X", "enc_valid_lens"]
D2L_AXES = [{0: "batch", 1: "src_time"}, {0: "batch", 1: "time"}, {0: "batch"}]


class StatefulLSTM(nn.Module):
    """forward(x, (h0, c0)) -> (logits, (h_n, c_n)): nested inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 5, num_layers=2, batch_first=True)
        self.fc = nn.Linear(5, 2)

    def forward(self, x, state):
        out, (h, c) = self.lstm(x, state)
        return self.fc(out), (h, c)


def lstm_example():
    return torch.randn(2, 5, 3), (torch.randn(2, 2, 5), torch.randn(2, 2, 5))


LSTM_NAMES = ["x", "h0", "c0"]
LSTM_AXES = {"x": {0: "batch", 1: "time"}, "h0": {1: "batch"}, "c0": {1: "batch"}}


def test_dynamic_shapes_mirror_the_nesting_and_the_signature():
    spec = ExportSpec.from_example(d2l_example(), D2L_NAMES, ["logits"], D2L_AXES)
    shapes = spec.dynamic_shapes(d2l_model())
    # torch.export binds (enc_X, dec_X, enc_valid_lens) as enc_X, dec_X, args=(enc_valid_lens,)
    assert len(shapes) == 3 and isinstance(shapes[2], tuple) and len(shapes[2]) == 1
    assert str(shapes[0][1]) != str(shapes[1][1]), "source and target lengths are distinct dims"
    spec = ExportSpec.from_example(lstm_example(), LSTM_NAMES, ["y", "h", "c"], LSTM_AXES)
    shapes = spec.dynamic_shapes(StatefulLSTM())
    assert isinstance(shapes[1], tuple) and [list(s) for s in shapes[1]] == [[1], [1]]
    x, (h0, c0) = spec.make_inputs(4, 9, torch.Generator().manual_seed(0), False)
    assert x.shape == (4, 9, 3) and h0.shape == c0.shape == (2, 4, 5)


def test_d2l_encoder_decoder_with_star_args_exports_with_dynamic_axes(tmp_path):
    model = d2l_model()
    result = export_model(model, d2l_example(), tmp_path / "art", input_names=D2L_NAMES,
                          output_names=["logits"], dynamic_axes=D2L_AXES, trace_length=TRACE)
    report = result.parity
    assert report.passed and {r.format for r in report.rows} == {"onnx", "torchscript", "pt2"}
    assert max(report.worst().values()) < 1e-5
    assert {"b=8 t=12", "b=1 t=1", "b=8 t=12 mixed pad"} <= {r.case for r in report.rows}
    proto = onnx.load(str(result.out_dir / "model.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims == {"enc_X": ["batch", "src_time"], "dec_X": ["batch", "time"], "enc_valid_lens": ["batch"]}
    # at a batch and lengths the example never had, valid lengths below the source's
    enc_X, dec_X = torch.randint(0, 11, (5, 9)), torch.randint(0, 13, (5, 4))
    valid = torch.tensor([9, 1, 4, 9, 6])
    expected = model(enc_X, dec_X, valid)
    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.ts"), ("pt2", "model.pt2")):
        got = load_runner(fmt, result.out_dir / name)(enc_X, dec_X, valid)
        torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=0)


def test_a_state_tuple_input_and_output_export_per_leaf(tmp_path):
    torch.manual_seed(0)
    model = StatefulLSTM().eval()
    result = export_model(model, lstm_example(), tmp_path / "art", input_names=LSTM_NAMES,
                          output_names=["y", "h", "c"], dynamic_axes=LSTM_AXES, trace_length=TRACE)
    assert result.parity.passed and max(result.parity.worst().values()) < 1e-5
    assert {r.output for r in result.parity.rows} == {"y", "h", "c"}
    assert [i["name"] for i in result.manifest["parts"]["model"]["inputs"]] == LSTM_NAMES
    assert result.manifest["parts"]["model"]["inputs"][1]["dims"] == [2, "batch", 5]
    x, state = torch.randn(7, 11, 3), (torch.randn(2, 7, 5), torch.randn(2, 7, 5))
    y, (h, c) = model(x, state)
    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.ts"), ("pt2", "model.pt2")):
        got = load_runner(fmt, result.out_dir / name)(x, state)
        for g, e in zip(got, (y, h, c)):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_names=["x", "state"]), r"2 names for 3 example input tensors.*example_inputs\[1\]\[0\], "
                                       r"example_inputs\[1\]\[1\]"),
    (dict(dynamic_axes={"x": {0: "batch"}, "hidden": {1: "batch"}}), r"dynamic_axes names \['hidden'\]"),
    (dict(dynamic_axes=[{0: "batch"}, {1: "batch"}]), "dynamic_axes has 2 entries for 3 input tensors"),
    (dict(dynamic_axes={"h0": {3: "batch"}}), r"dynamic_axes of 'h0' \(example_inputs\[1\]\[0\]"),
    (dict(output_names=["y", "h"]), r"returns 3 output tensors .* output_names names 2"),
    (dict(example_inputs=(torch.randn(2, 5, 3), (torch.randn(2, 2, 5), 0.5))),
     r"example_inputs\[1\]\[1\] is float: every argument must be a tensor"),
])
def test_nested_input_mistakes_are_export_errors_naming_them(kwargs, match, tmp_path):
    args = dict(example_inputs=lstm_example(), input_names=LSTM_NAMES, output_names=["y", "h", "c"],
                dynamic_axes=LSTM_AXES, formats=("onnx",))
    args.update(kwargs)
    with pytest.raises(ExportError, match=match):
        export_model(StatefulLSTM().eval(), out_dir=tmp_path / "art", **args)
    assert list(tmp_path.iterdir()) == []
