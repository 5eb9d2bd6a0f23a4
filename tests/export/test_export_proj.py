"""Export of LSTMs with a projection (torch.nn.LSTM's proj_size, issue 23). ONNX's LSTM has
none, so seqfuse's lstm_proj_layer is written as one ONNX Scan per direction
(export/onnx_ops.py); each format must match eager PyTorch at new batch sizes and lengths."""
from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from seqfuse.export import export_model

TRACE = 6


class ProjTagger(nn.Module):
    """A user's model on plain torch.nn: a 2-layer BiLSTM with projections over token ids,
    with per-row lengths."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.lstm = nn.LSTM(8, 12, num_layers=2, bidirectional=True, batch_first=True, proj_size=5)
        self.fc = nn.Linear(10, 3)

    def forward(self, input_ids, lengths):
        import seqfuse.nn

        if isinstance(self.lstm, seqfuse.nn.LSTM):
            out, (h, c) = self.lstm(self.emb(input_ids), lengths=lengths)
        else:  # the torch.nn original (eager reference): packed
            packed = nn.utils.rnn.pack_padded_sequence(self.emb(input_ids), lengths, batch_first=True,
                                                       enforce_sorted=False)
            out, (h, c) = self.lstm(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True,
                                                      total_length=input_ids.shape[1])
        return self.fc(out), h, c


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2", "aoti"])
def test_a_projected_lstm_model_exports_with_parity(tmp_path, fmt):
    torch.manual_seed(0)
    model = ProjTagger().eval()
    example = (torch.randint(0, 30, (3, 7)), torch.tensor([7, 2, 5]))
    result = export_model(model, example, tmp_path / "art", formats=(fmt,),
                          input_names=["input_ids", "lengths"], output_names=["logits", "h_n", "c_n"],
                          dynamic_axes=[{0: "batch", 1: "time"}, {0: "batch"}], trace_length=TRACE)
    assert result.parity.passed
    cases = {r.case for r in result.parity.rows}
    assert "b=1 t=1" in cases and len(cases) >= 3
    if fmt == "onnx":
        graph = onnx.load(str(tmp_path / "art" / "model.onnx")).graph
        ops = {n.op_type for n in graph.node}
        assert "Scan" in ops and "LSTM" not in ops  # ONNX's LSTM has no projection
