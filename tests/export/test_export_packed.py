"""Models that call pack_padded_sequence export as written (issue 23): the torch.nn
original given to export_model, and the same model after seqfuse.nn.convert. export_model
traces them under seqfuse.nn.packing.symbolic_packing (ONNX, torch.export, AOTInductor:
a padded input plus lengths, ONNX `sequence_lens`); TorchScript traces torch's own packing
ops. Parity is against the eager torch.nn model at new batch sizes and lengths, and on
batches padded wider than their longest row (pad_packed_sequence is then narrower than
the input, in eager and in the graphs alike)."""
import threading

import onnx
import pytest
import torch
from conftest import requires_native
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import seqfuse.nn
from seqfuse.export import ExportError, ParityError, export_model, load_runner
from seqfuse.nn.packing import SymbolicPackingError, symbolic_packing

pytestmark = requires_native

TRACE = 6
VOCAB = 17


class PackedBiGRU(nn.Module):
    """The classic classifier: Embedding, pack (unsorted), 2-layer BiGRU, last states."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 5, padding_idx=0)
        self.gru = nn.GRU(5, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, input_ids, lengths):
        packed = pack_padded_sequence(self.embedding(input_ids), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, h_n = self.gru(packed)
        return self.fc(torch.cat([h_n[-2], h_n[-1]], dim=1))


class PackedLSTMMean(nn.Module):
    """pad_packed_sequence's output, averaged over each row's valid positions."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 4, padding_idx=0)
        self.lstm = nn.LSTM(4, 5, num_layers=2, batch_first=True)
        self.fc = nn.Linear(5, 2)

    def forward(self, input_ids, lengths):
        packed = pack_padded_sequence(self.embedding(input_ids), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, out_lengths = pad_packed_sequence(out, batch_first=True)  # [B, max(lengths), H]
        mask = torch.arange(out.shape[1]).unsqueeze(0) < out_lengths.unsqueeze(1)
        mean = (out * mask.unsqueeze(-1)).sum(1) / out_lengths.unsqueeze(1).to(out.dtype)
        return self.fc(mean)


class SortedTagger(nn.Module):
    """Time-major, the older pattern: sort by length, pack with enforce_sorted=True, an
    RNN, a Linear and dropout on packed.data, pad with a padding_value, unsort."""

    def __init__(self, total_length: bool):
        super().__init__()
        self.total_length = total_length
        self.embedding = nn.Embedding(VOCAB, 4)
        self.rnn = nn.RNN(4, 5, bidirectional=True)
        self.proj = nn.Linear(10, 3)
        self.dropout = nn.Dropout(0.3)

    def forward(self, input_ids, lengths):  # input_ids [T, B]
        lengths, order = lengths.sort(descending=True)
        x = self.embedding(input_ids).index_select(1, order)
        out, _ = self.rnn(pack_padded_sequence(x, lengths))
        out = PackedSequence(self.dropout(self.proj(out.data)), out.batch_sizes, out.sorted_indices,
                             out.unsorted_indices)
        total = input_ids.shape[0] if self.total_length else None
        padded, _ = pad_packed_sequence(out, padding_value=-1.0, total_length=total)
        return padded.index_select(1, torch.argsort(order))  # [T or max(lengths), B, 3]


def example(batch_first=True):
    ids = torch.randint(1, VOCAB, (3, 7))
    lengths = torch.tensor([4, 7, 2])
    ids[torch.arange(7) >= lengths.unsqueeze(1)] = 0
    return (ids if batch_first else ids.t().contiguous()), lengths


def short_rows(batch_first=True):
    """A batch padded wider (9) than its longest row (5)."""
    ids = torch.randint(1, VOCAB, (4, 9))
    lengths = torch.tensor([3, 5, 1, 5])
    ids[torch.arange(9) >= lengths.unsqueeze(1)] = 0
    return (ids if batch_first else ids.t().contiguous()), lengths


def export(model, tmp_path, batch_first=True, formats=("onnx", "torchscript", "pt2"), **kwargs):
    axes = [{0: "batch", 1: "time"} if batch_first else {0: "time", 1: "batch"}, {0: "batch"}]
    return export_model(model, example(batch_first), tmp_path / "art", input_names=["input_ids", "lengths"],
                        output_names=["out"], dynamic_axes=axes, formats=formats, trace_length=TRACE,
                        heldout=[short_rows(batch_first)], **kwargs)


def build(cls, *args):
    torch.manual_seed(0)
    return cls(*args).eval()


def _check_export(model, result, batch_first=True):
    report = result.parity
    assert report.passed and max(report.worst().values()) < 1e-5
    assert {r.format for r in report.rows} == {"onnx", "torchscript", "pt2"}
    real = "real[0] b=4 t=9" if batch_first else "real[0] b=9 t=4"  # named by the first input's shape
    assert {"b=1 t=1", "b=8 t=12", "b=8 t=12 mixed pad", real} <= {r.case for r in report.rows}
    proto = onnx.load(str(result.out_dir / "model.onnx"))
    recurrent = [n for n in proto.graph.node if n.op_type in ("LSTM", "GRU", "RNN")]
    assert recurrent and all(len(n.input) > 4 and n.input[4] for n in recurrent), "sequence_lens wired"
    # again here, at a batch and padding the export never saw
    ids, lengths = short_rows(batch_first)
    ids, lengths = torch.cat([ids, ids[:1]] if batch_first else [ids, ids[:, :1]], 1 - batch_first), \
        torch.cat([lengths, lengths[:1]])
    expected = model(ids, lengths)
    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.ts"), ("pt2", "model.pt2")):
        got = load_runner(fmt, result.out_dir / name)(ids, lengths)[0]
        assert got.shape == expected.shape, fmt
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [PackedBiGRU, PackedLSTMMean])
@pytest.mark.parametrize("converted", [False, True], ids=["torch.nn", "converted"])
def test_a_packed_model_exports_as_written(cls, converted, tmp_path):
    model = build(cls)
    given = seqfuse.nn.convert(build(cls)) if converted else model
    result = export(given, tmp_path)
    _check_export(model, result)
    if not converted:  # the model itself is untouched, and still runs torch.nn's packing
        assert type(model.get_submodule("gru" if cls is PackedBiGRU else "lstm")).__module__.startswith("torch.nn")


@pytest.mark.parametrize("total_length", [False, True])
def test_sorted_time_major_packing_with_work_on_packed_data(total_length, tmp_path):
    model = build(SortedTagger, total_length)
    result = export(model, tmp_path, batch_first=False)
    _check_export(model, result, batch_first=False)
    real = [r for r in result.parity.rows if r.case.startswith("real[0]")]
    assert len(real) == 3 and all(r.passed for r in real)  # width 9 with total_length, 5 without: as eager


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_lengths_read_as_a_python_list_is_an_export_error_saying_why(fmt, tmp_path):
    """lengths.tolist() turns the lengths into numbers that a graph cannot depend on
    (torch.export cannot make a tensor of them; a TorchScript trace bakes them in)."""
    class ListLengths(PackedBiGRU):
        def forward(self, input_ids, lengths):
            packed = pack_padded_sequence(self.embedding(input_ids), lengths.tolist(), batch_first=True,
                                          enforce_sorted=False)
            _, h_n = self.gru(packed)
            return self.fc(torch.cat([h_n[-2], h_n[-1]], dim=1))

    with pytest.raises(ExportError, match=r"reads a tensor's values as Python numbers.*not lengths.tolist\(\)"):
        export(build(ListLengths), tmp_path, formats=(fmt,))
    assert not (tmp_path / "art").exists()


def test_using_packed_data_as_the_flat_tensor_is_refused(tmp_path):
    """packed.data's first dimension is sum(lengths) in eager: the symbolic packing's is
    the padded time axis, so such a model must fail the export (the parity checks see
    other shapes), never export wrongly. TorchScript, tracing torch's packing, is exact."""
    class FlatData(PackedBiGRU):
        def forward(self, input_ids, lengths):
            packed = pack_padded_sequence(self.embedding(input_ids), lengths.cpu(), batch_first=True,
                                          enforce_sorted=False)
            out, _ = self.gru(packed)
            return self.fc(out.data)  # [sum(lengths), 3]

    with pytest.raises(ParityError) as exc:
        export(build(FlatData), tmp_path, formats=("onnx",))
    failed = [r for r in exc.value.report.rows if not r.passed]
    assert failed and all(r.max_abs == float("inf") for r in failed), "caught as a shape mismatch"
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_the_symbolic_packing_computes_what_torch_packing_does(kind, batch_first, enforce_sorted):
    """Eagerly, inside the context: seqfuse's layer on the symbolic packing against
    torch.nn's on torch's, with an initial state in the caller's order, h_n in the
    caller's order, and pad_packed_sequence's padding_value and total_length."""
    torch.manual_seed(0)
    ref = getattr(nn, kind)(3, 4, num_layers=2, bidirectional=True, batch_first=batch_first).eval()
    layer = seqfuse.nn.convert(getattr(nn, kind)(3, 4, num_layers=2, bidirectional=True,
                                                 batch_first=batch_first)).eval()
    layer.load_state_dict(ref.state_dict())
    lengths = torch.tensor([5, 4, 4, 1]) if enforce_sorted else torch.tensor([2, 5, 1, 4])
    x = torch.randn(4, 6, 3) if batch_first else torch.randn(6, 4, 3)  # padded wider than 5
    h0 = torch.randn(4, 4, 4)
    hx = (h0, torch.randn(4, 4, 4)) if kind == "LSTM" else h0

    def run(module):
        packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
        out, h_n = module(packed, hx)
        default, out_lengths = pad_packed_sequence(out, batch_first=batch_first, padding_value=-2.0)
        total, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=8)
        return default, total, out_lengths, h_n

    expected = run(ref)
    with torch.no_grad(), symbolic_packing():
        got = run(layer)
    assert expected[0].shape[int(batch_first)] == 5 and expected[1].shape[int(batch_first)] == 8
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_nothing_is_patched_outside_the_export_trace():
    names = ("_pack_padded_sequence", "_pad_packed_sequence")
    before = {n: getattr(torch._VF, n) for n in names}
    seen = {}

    def other_thread():  # while the context is open in the main thread
        x = torch.randn(4, 2, 3)
        seen["data"] = pack_padded_sequence(x, [4, 2]).data.shape

    with symbolic_packing():
        assert torch._VF._pack_padded_sequence is not before["_pack_padded_sequence"]
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        inside = pack_padded_sequence(torch.randn(4, 2, 3), torch.tensor([4, 2])).data.shape
    assert seen["data"] == (6, 3), "another thread gets torch's packing"
    assert inside == (4, 2, 3), "this thread gets the symbolic one: [max(lengths), B, *]"
    assert all(n not in vars(torch._VF) for n in names) and {n: getattr(torch._VF, n) for n in names} == before
    with pytest.raises(RuntimeError, match="boom"), symbolic_packing():
        raise RuntimeError("boom")
    assert all(n not in vars(torch._VF) for n in names), "restored after an error too"


def test_a_hand_made_packed_sequence_is_a_clear_error():
    gru = seqfuse.nn.GRU(3, 4)
    with symbolic_packing(), pytest.raises(SymbolicPackingError, match="not made by pack_padded_sequence"):
        gru(PackedSequence(torch.randn(5, 3), torch.tensor([2, 2, 1])))


def test_torch_export_of_a_packed_seqfuse_layer_names_the_way_out():
    """Outside export_model, torch.export of a PackedSequence failed with an opaque
    GuardOnDataDependentSymNode inside _check_packed."""
    model = seqfuse.nn.convert(build(PackedBiGRU))
    with pytest.raises(Exception, match="export_model, which traces pack_padded_sequence"):
        torch.export.export(model, example(), strict=False)
