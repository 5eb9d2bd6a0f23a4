"""Text classifiers on seqfuse layers. Each takes forward(input_ids [B, T] int64,
lengths [B] int64 | None) and returns logits [B, num_classes] (bilstm-attention also the
attention weights). Without `lengths`, a row's length is its count of non-pad tokens
(right padding). `self.config` holds the constructor arguments (saved in checkpoints)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...nn import GRU, LSTM, AdditiveAttention, TransformerEncoder, TransformerEncoderLayer
from .common import (check_tokens, final_hidden, last_valid, lengths_from_padding, padding_mask,
                     run_embedded, sinusoidal_positions)


class _TokenModel(nn.Module):
    """Embedding and the lengths convention shared by the text models."""

    def __init__(self, vocab_size: int, embed_dim: int, pad_idx: int):
        super().__init__()
        self.pad_idx = pad_idx
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_idx)

    def lengths_from_padding(self, input_ids: Tensor) -> Tensor:
        return lengths_from_padding(input_ids, self.pad_idx)

    def _lengths(self, input_ids: Tensor, lengths: Tensor | None) -> Tensor:
        """Checks the tokens; lengths as given, or from the padding."""
        check_tokens(input_ids, lengths, vocab_size=self.embedding.num_embeddings)
        return self.lengths_from_padding(input_ids) if lengths is None else lengths

    def _embed(self, input_ids: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
        lengths = self._lengths(input_ids, lengths)
        return self.embedding(input_ids), lengths

    def export_plan(self):
        """(input_ids, lengths) -> logits, one graph (seqfuse.export)."""
        from ..plans import classifier_plan

        return classifier_plan(self)


class LSTMClassifier(_TokenModel):
    """Embedding -> LSTM over the valid tokens -> last layer's final hidden state (both
    directions concatenated) -> dropout -> Linear."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_classes: int,
                 num_layers: int = 1, bidirectional: bool = False, pad_idx: int = 0,
                 dropout: float = 0.0, backend: str = "auto"):
        super().__init__(vocab_size, embed_dim, pad_idx)
        self.config = dict(vocab_size=vocab_size, embed_dim=embed_dim, hidden_size=hidden_size,
                           num_classes=num_classes, num_layers=num_layers,
                           bidirectional=bidirectional, pad_idx=pad_idx, dropout=dropout)
        self.lstm = LSTM(embed_dim, hidden_size, num_layers=num_layers, batch_first=True,
                         bidirectional=bidirectional, dropout=dropout if num_layers > 1 else 0.0,
                         backend=backend)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)

    def forward(self, input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        lengths = self._lengths(input_ids, lengths)
        _, (h_n, _) = run_embedded(self.lstm, self.embedding, input_ids, lengths)
        return self.fc(self.dropout(final_hidden(h_n, 2 if self.lstm.bidirectional else 1)))


class BiLSTMClassifier(_TokenModel):
    """Embedding -> BiLSTM -> the output at each row's last valid step -> dropout -> Linear.
    (The classic recipe: at that step the forward direction has read the whole text, the
    backward direction only its last token.)"""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_classes: int,
                 pad_idx: int = 0, dropout: float = 0.0, backend: str = "auto"):
        super().__init__(vocab_size, embed_dim, pad_idx)
        self.config = dict(vocab_size=vocab_size, embed_dim=embed_dim, hidden_size=hidden_size,
                           num_classes=num_classes, pad_idx=pad_idx, dropout=dropout)
        self.lstm = LSTM(embed_dim, hidden_size, batch_first=True, bidirectional=True, backend=backend)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * hidden_size, num_classes)

    def forward(self, input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        lengths = self._lengths(input_ids, lengths)
        out, _ = run_embedded(self.lstm, self.embedding, input_ids, lengths)
        return self.fc(self.dropout(last_valid(out, lengths)))


class AttentionPooling(nn.Module):
    """Masked additive attention pooling: score_t = v . tanh(W h_t + b) over the valid
    steps, softmax, weighted sum. It is seqfuse's AdditiveAttention with one learned query
    (W_q q plays the role of b), so the fused op computes it.

    forward(h [B, T, F], lengths [B]) -> (pooled [B, F], weights [B, T])."""

    def __init__(self, input_size: int, attention_size: int, backend: str = "auto"):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, attention_size))
        self.attention = AdditiveAttention(input_size, attention_size, attention_size, backend=backend)

    def forward(self, h: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        q = self.query.expand(h.shape[0], 1, -1)
        # This call's weights, not the module's attention_weights: threads may share the model.
        pooled, weights = self.attention.forward_with_weights(q, h, h, lengths)
        return pooled.squeeze(1), weights.squeeze(1)


class BiLSTMAttention(_TokenModel):
    """Embedding -> BiLSTM -> masked additive attention pooling -> dropout -> Linear.
    forward returns (logits [B, num_classes], attention weights [B, T])."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_classes: int,
                 attention_size: int = 64, pad_idx: int = 0, dropout: float = 0.0,
                 embed_dropout: float = 0.0, backend: str = "auto"):
        super().__init__(vocab_size, embed_dim, pad_idx)
        self.config = dict(vocab_size=vocab_size, embed_dim=embed_dim, hidden_size=hidden_size,
                           num_classes=num_classes, attention_size=attention_size, pad_idx=pad_idx,
                           dropout=dropout, embed_dropout=embed_dropout)
        self.embed_dropout = nn.Dropout(embed_dropout)
        self.lstm = LSTM(embed_dim, hidden_size, batch_first=True, bidirectional=True, backend=backend)
        self.pool = AttentionPooling(2 * hidden_size, attention_size, backend=backend)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * hidden_size, num_classes)

    def forward(self, input_ids: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lengths = self._lengths(input_ids, lengths)
        out, _ = run_embedded(self.lstm, self.embedding, input_ids, lengths, self.embed_dropout)
        pooled, weights = self.pool(out, lengths)
        return self.fc(self.dropout(pooled)), weights

    def export_plan(self):
        from ..plans import classifier_plan

        return classifier_plan(self, ("logits", "attention_weights"))


class BiGRUClassifier(_TokenModel):
    """Embedding -> bidirectional GRU (2 layers) over the valid tokens -> the last layer's
    final hidden states of both directions -> dropout -> Linear."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_classes: int,
                 num_layers: int = 2, pad_idx: int = 0, dropout: float = 0.0, backend: str = "auto"):
        super().__init__(vocab_size, embed_dim, pad_idx)
        self.config = dict(vocab_size=vocab_size, embed_dim=embed_dim, hidden_size=hidden_size,
                           num_classes=num_classes, num_layers=num_layers, pad_idx=pad_idx,
                           dropout=dropout)
        self.gru = GRU(embed_dim, hidden_size, num_layers=num_layers, batch_first=True,
                       bidirectional=True, dropout=dropout if num_layers > 1 else 0.0, backend=backend)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * hidden_size, num_classes)

    def forward(self, input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        lengths = self._lengths(input_ids, lengths)
        _, h_n = run_embedded(self.gru, self.embedding, input_ids, lengths)
        return self.fc(self.dropout(final_hidden(h_n, 2)))


class TransformerClassifier(_TokenModel):
    """Embedding * sqrt(d) + sinusoidal positions -> TransformerEncoder (self-attention
    masked to the valid tokens) -> mean over the valid tokens -> dropout -> Linear."""

    def __init__(self, vocab_size: int, d_model: int, num_classes: int, nhead: int = 4,
                 num_layers: int = 2, dim_feedforward: int = 256, max_len: int = 512,
                 pad_idx: int = 0, dropout: float = 0.1, backend: str = "auto"):
        super().__init__(vocab_size, d_model, pad_idx)
        self.config = dict(vocab_size=vocab_size, d_model=d_model, num_classes=num_classes,
                           nhead=nhead, num_layers=num_layers, dim_feedforward=dim_feedforward,
                           max_len=max_len, pad_idx=pad_idx, dropout=dropout)
        self.scale = d_model ** 0.5
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        self.embed_dropout = nn.Dropout(dropout)
        layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True,
                                        backend=backend)
        self.encoder = TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(d_model, num_classes)

    def forward(self, input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        x, lengths = self._embed(input_ids, lengths)
        T = x.shape[1]
        if T > self.positions.shape[0]:
            raise ValueError(f"input_ids has {T} tokens, more than max_len={self.positions.shape[0]}")
        x = self.embed_dropout(x * self.scale + self.positions[:T])
        pad = padding_mask(lengths.to(x.device), T)
        h = self.encoder(x, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1)
        return self.fc(self.dropout(pooled))

