"""Models over dense sequences and per-token outputs: an image read row by row, a price
regressor and a tagger."""
from __future__ import annotations

from torch import Tensor, nn

from ...nn import LSTM
from .common import check_dense, check_tokens, lengths_from_padding, run_embedded, run_recurrent


class LSTMRows(nn.Module):
    """An LSTM reads a 28x28 image one row (28 pixels) per step; its final hidden state
    -> Linear. forward(images [B, 28, 28] float) -> logits [B, num_classes]."""

    def __init__(self, hidden_size: int = 128, num_classes: int = 10, rows: int = 28,
                 cols: int = 28, num_layers: int = 1, backend: str = "auto"):
        super().__init__()
        self.config = dict(hidden_size=hidden_size, num_classes=num_classes, rows=rows, cols=cols,
                           num_layers=num_layers)
        self.lstm = LSTM(cols, hidden_size, num_layers=num_layers, batch_first=True, backend=backend)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        check_dense(images, self.config["cols"], "images")
        _, (h_n, _) = self.lstm(images)
        return self.fc(h_n[-1])

    def export_plan(self):
        from ..plans import rows_plan

        return rows_plan(self)


class LSTMRegressor(nn.Module):
    """2-layer LSTM (dropout between layers) over a window of daily features -> Linear ->
    the next value. The Linear predicts the change from the last value (residual form),
    so an untrained model starts at the last-value baseline.
    forward(x [B, window, features] float) -> [B]."""

    def __init__(self, num_features: int = 5, hidden_size: int = 64, num_layers: int = 2,
                 dropout: float = 0.2, backend: str = "auto"):
        super().__init__()
        self.config = dict(num_features=num_features, hidden_size=hidden_size,
                           num_layers=num_layers, dropout=dropout)
        self.lstm = LSTM(num_features, hidden_size, num_layers=num_layers, batch_first=True,
                         dropout=dropout if num_layers > 1 else 0.0, backend=backend)
        self.fc = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_dense(x, self.config["num_features"], "x")
        _, (h_n, _) = self.lstm(x)
        return self.fc(h_n[-1]).squeeze(-1)

    def export_plan(self):
        from ..plans import regressor_plan

        return regressor_plan(self)


class LSTMTagger(nn.Module):
    """Embedding -> BiLSTM -> a Linear per token.
    forward(input_ids [B, T] int64, lengths [B] int64 | None) -> logits [B, T, num_tags]
    (rows past their length hold the tags of a zero state; the loss ignores them)."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_tags: int,
                 num_layers: int = 1, pad_idx: int = 0, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, embed_dim=embed_dim, hidden_size=hidden_size,
                           num_tags=num_tags, num_layers=num_layers, pad_idx=pad_idx, dropout=dropout)
        self.pad_idx = pad_idx
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_idx)
        self.lstm = LSTM(embed_dim, hidden_size, num_layers=num_layers, batch_first=True,
                         bidirectional=True, dropout=dropout if num_layers > 1 else 0.0, backend=backend)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * hidden_size, num_tags)

    def forward(self, input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        check_tokens(input_ids, lengths, vocab_size=self.embedding.num_embeddings)
        if lengths is None:
            lengths = lengths_from_padding(input_ids, self.pad_idx)
        out, _ = run_embedded(self.lstm, self.embedding, input_ids, lengths)
        return self.fc(self.dropout(out))

    def export_plan(self):
        from ..plans import tagger_plan

        return tagger_plan(self)


__all__ = ["LSTMRegressor", "LSTMRows", "LSTMTagger"]
