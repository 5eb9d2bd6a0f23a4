"""Issue 23's "done when": the classic models, written the usual way with torch.nn and the
textbook attention classes, go through seqfuse.nn.convert and export_model as written.
convert() puts each recurrent layer and attention module on seqfuse's fused ops and matches
the original in outputs and gradients; export_model of the untouched original writes an
ONNX file of standard ops that matches it in onnxruntime at batches and lengths other than
the example's (length 1 included)."""
from __future__ import annotations

import copy
import warnings

import onnx
import pytest
import torch
from textbook_models import (AdditiveAttention, AttentionPool, EncoderDecoder,
                             Seq2SeqAttentionDecoder, Seq2SeqEncoder)
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqfuse.nn as snn
from seqfuse.export import export_model

TRACE = 6
V = 40  # vocabulary


class LSTMClassifier(nn.Module):
    """Embedding -> LSTM -> the last layer's h_n -> Linear."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(V, 8, padding_idx=0)
        self.lstm = nn.LSTM(8, 12, num_layers=2, batch_first=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, input_ids):
        _, (h_n, _) = self.lstm(self.embedding(input_ids))
        return self.fc(h_n[-1])


class BiLSTMPackedClassifier(nn.Module):
    """Embedding -> pack_padded_sequence -> BiLSTM -> both directions' h_n -> Linear."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(V, 8, padding_idx=0)
        self.lstm = nn.LSTM(8, 10, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(20, 2)

    def forward(self, input_ids, lengths):
        packed = pack_padded_sequence(self.embedding(input_ids), lengths, batch_first=True,
                                      enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        return self.fc(torch.cat([h_n[-2], h_n[-1]], dim=1))


class BiLSTMAttentionClassifier(nn.Module):
    """Embedding -> BiLSTM -> additive attention pooling over the valid steps -> Linear."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(V, 8, padding_idx=0)
        self.lstm = nn.LSTM(8, 9, batch_first=True, bidirectional=True)
        self.attention = AttentionPool(18, 6)
        self.fc = nn.Linear(18, 3)

    def forward(self, input_ids, lengths):
        out, _ = self.lstm(self.embedding(input_ids))
        mask = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] < lengths[:, None]
        pooled, _ = self.attention(out, mask)
        return self.fc(pooled)


class BiGRUPackedClassifier(nn.Module):
    """Embedding -> pack_padded_sequence -> 2-layer BiGRU -> the last layer's h_n."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(V, 8, padding_idx=0)
        self.gru = nn.GRU(8, 10, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(20, 4)

    def forward(self, input_ids, lengths):
        packed = pack_padded_sequence(self.embedding(input_ids), lengths, batch_first=True,
                                      enforce_sorted=False)
        _, h_n = self.gru(packed)
        return self.fc(torch.cat([h_n[-2], h_n[-1]], dim=1))


class RowLSTM(nn.Module):
    """An image read row by row (MNIST's 28 x 28): LSTM -> last step's output -> Linear."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(28, 16, batch_first=True)
        self.fc = nn.Linear(16, 10)

    def forward(self, image):
        out, _ = self.lstm(image)
        return self.fc(out[:, -1])


class StockRegressor(nn.Module):
    """A window of daily features -> 2-layer LSTM with dropout -> next value."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(5, 16, num_layers=2, batch_first=True, dropout=0.2)
        self.head = nn.Linear(16, 1)

    def forward(self, window):
        out, _ = self.lstm(window)
        return self.head(out[:, -1]).squeeze(-1)


class Tagger(nn.Module):
    """Embedding -> packed BiLSTM -> pad_packed_sequence -> per-token Linear."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(V, 8, padding_idx=0)
        self.lstm = nn.LSTM(8, 10, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(20, 5)

    def forward(self, input_ids, lengths):
        packed = pack_padded_sequence(self.embedding(input_ids), lengths, batch_first=True,
                                      enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=input_ids.shape[1])
        return self.fc(out)


def seq2seq() -> nn.Module:
    """d2l's GRU encoder-decoder with Bahdanau (additive) attention, as the book writes it.
    Its decoder loops over the target steps in Python, so the target length is the
    example's; batch and source length stay dynamic."""
    model = EncoderDecoder(Seq2SeqEncoder(V, 8, 12, 2), Seq2SeqAttentionDecoder(V, 8, 12, 2))
    with torch.no_grad():  # d2l's LazyLinear takes its size on a first call
        model(torch.randint(1, V, (2, 5)), torch.randint(1, V, (2, 4)), torch.tensor([5, 3]))
    return model


def _ids(B, T):
    return torch.randint(1, V, (B, T))


# name: (model factory, example inputs, input names, output names, dynamic axes, fused kinds)
CLASSICS = {
    "lstm-classifier": (LSTMClassifier, lambda: (_ids(3, 7),), ["input_ids"], ["logits"],
                        [{0: "batch", 1: "time"}], {snn.LSTM}),
    "bilstm-packed-classifier": (BiLSTMPackedClassifier, lambda: (_ids(3, 7), torch.tensor([7, 2, 5])),
                                 ["input_ids", "lengths"], ["logits"],
                                 [{0: "batch", 1: "time"}, {0: "batch"}], {snn.LSTM}),
    "bilstm-attention": (BiLSTMAttentionClassifier, lambda: (_ids(3, 7), torch.tensor([7, 2, 5])),
                         ["input_ids", "lengths"], ["logits"], [{0: "batch", 1: "time"}, {0: "batch"}],
                         {snn.LSTM, snn.AdditivePooling}),
    "bigru-packed-classifier": (BiGRUPackedClassifier, lambda: (_ids(3, 7), torch.tensor([7, 2, 5])),
                                ["input_ids", "lengths"], ["logits"],
                                [{0: "batch", 1: "time"}, {0: "batch"}], {snn.GRU}),
    "row-lstm": (RowLSTM, lambda: (torch.rand(3, 28, 28),), ["image"], ["logits"], [{0: "batch"}],
                 {snn.LSTM}),
    "stock-regressor": (StockRegressor, lambda: (torch.randn(3, 9, 5),), ["window"], ["prediction"],
                        [{0: "batch", 1: "time"}], {snn.LSTM}),
    "tagger": (Tagger, lambda: (_ids(3, 7), torch.tensor([7, 2, 5])), ["input_ids", "lengths"],
               ["tags"], [{0: "batch", 1: "time"}, {0: "batch"}], {snn.LSTM}),
    "gru-seq2seq-attention": (seq2seq, lambda: (_ids(3, 7), _ids(3, 4), torch.tensor([7, 2, 5])),
                              ["enc_X", "dec_X", "enc_valid_lens"], ["logits"],
                              [{0: "batch", 1: "src_time"}, {0: "batch"}, {0: "batch"}],
                              {snn.GRU, snn.AdditiveAttention}),
}


def _outputs_and_grads(model, inputs):
    out = model(*inputs)
    gen = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=gen)).sum()
    params = [p for _, p in sorted(model.named_parameters())]
    return out, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("name", CLASSICS)
def test_classic_model_converts_and_exports_as_written(name, tmp_path):
    make, example_fn, inputs, outputs, axes, fused = CLASSICS[name]
    torch.manual_seed(0)
    model = make().eval()
    example = example_fn()

    # convert: the fused modules in place of torch.nn's and the textbook attention, the
    # same results and gradients (the dropout of the regressor is off in eval)
    with warnings.catch_warnings():
        warnings.simplefilter("error", snn.ConversionWarning)  # every textbook class matched
        converted = snn.convert(copy.deepcopy(model))
    kinds = {type(m) for m in converted.modules()}
    assert fused <= kinds, f"not swapped: {fused - kinds}"
    assert not kinds & {nn.LSTM, nn.GRU, nn.RNN, AdditiveAttention, AttentionPool}
    want, want_grads = _outputs_and_grads(model, example)
    got, got_grads = _outputs_and_grads(converted, example)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    # export_model of the original as written: ONNX, parity in onnxruntime at new shapes.
    # The original has just run under autograd: d2l's decoder now holds attention weights
    # with a graph (non-leaf tensors), which export_model's copy of the model must survive.
    result = export_model(model, example, tmp_path / "art", formats=("onnx",), input_names=inputs,
                          output_names=outputs, dynamic_axes=axes, trace_length=TRACE)
    assert result.parity.passed
    example_batch = example[0].shape[0]
    batches = {r.case for r in result.parity.rows}
    assert any(not c.startswith(f"b={example_batch} ") for c in batches), batches
    graph = onnx.load(str(tmp_path / "art" / "model.onnx")).graph
    node_types = {n.op_type for n in graph.node}
    recurrent = {snn.LSTM: "LSTM", snn.GRU: "GRU"}
    for kind, onnx_op in recurrent.items():
        if kind in fused:
            assert onnx_op in node_types, f"{onnx_op} missing from {sorted(node_types)}"
