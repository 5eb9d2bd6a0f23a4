"""Text classifiers on seqfuse layers."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn import LSTM


class LSTMClassifier(nn.Module):
    """Embedding -> LSTM over the valid tokens -> last layer's final hidden state (both
    directions concatenated) -> Linear.

    forward(input_ids [B, T] int64, lengths [B] int64 | None) -> logits [B, num_classes].
    Without `lengths`, each row's length is its count of non-pad tokens (right padding);
    an empty row is read as one pad token so that it still gets a prediction.
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_classes: int,
                 num_layers: int = 1, bidirectional: bool = False, pad_idx: int = 0,
                 dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, embed_dim=embed_dim, hidden_size=hidden_size,
                           num_classes=num_classes, num_layers=num_layers,
                           bidirectional=bidirectional, pad_idx=pad_idx, dropout=dropout)
        self.pad_idx = pad_idx
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_idx)
        self.lstm = LSTM(embed_dim, hidden_size, num_layers=num_layers, batch_first=True,
                         bidirectional=bidirectional, dropout=dropout if num_layers > 1 else 0.0,
                         backend=backend)
        self.dropout = nn.Dropout(dropout)
        directions = 2 if bidirectional else 1
        self.fc = nn.Linear(hidden_size * directions, num_classes)

    def lengths_from_padding(self, input_ids: Tensor) -> Tensor:
        return (input_ids != self.pad_idx).sum(dim=1).clamp(min=1)

    def forward(self, input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if lengths is None:
            lengths = self.lengths_from_padding(input_ids)
        _, (h_n, _) = self.lstm(self.embedding(input_ids), lengths=lengths)
        D = 2 if self.lstm.bidirectional else 1
        last = h_n[-D:]  # [D, B, H]: the last layer's directions
        features = torch.cat(list(last.unbind(0)), dim=1)  # [B, D*H]
        return self.fc(self.dropout(features))
