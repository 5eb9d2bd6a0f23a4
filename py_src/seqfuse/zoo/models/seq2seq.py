"""GRU encoder-decoder with additive (Bahdanau) attention: characters -> phonemes.

Encoder: Embedding -> bidirectional GRU over the valid source tokens -> outputs
[B, S, 2H]; the decoder's first state is tanh(Linear(both final states)).
Decoder, one step: the attention query is the previous decoder state; the context (masked
to each source's length) is concatenated to the embedded previous token and fed to a GRU;
the output layer reads [state, context, embedding]. Training feeds the gold previous
token (teacher forcing); `greedy_decode` feeds back its own argmax until <eos>.

Token conventions: target ids come without <bos>/<eos>; the model's vocabulary has
<pad>=0, <unk>=1, <bos>=2, <eos>=3 (seqfuse.zoo.data.g2p_splits)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ... import functional
from ...decoding import greedy_loop
from ...nn import GRU, AdditiveAttention
from .common import check_tokens, lengths_from_padding, run_embedded

PAD_ID, BOS_ID, EOS_ID = 0, 2, 3


class Seq2SeqAttention(nn.Module):
    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, embed_dim: int = 64,
                 hidden_size: int = 128, attention_size: int = 128, dropout: float = 0.0,
                 max_decode_len: int = 24, backend: str = "auto"):
        super().__init__()
        self.config = dict(src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size,
                           embed_dim=embed_dim, hidden_size=hidden_size,
                           attention_size=attention_size, dropout=dropout,
                           max_decode_len=max_decode_len)
        H = hidden_size
        self.src_embedding = nn.Embedding(src_vocab_size, embed_dim, padding_idx=PAD_ID)
        self.encoder = GRU(embed_dim, H, batch_first=True, bidirectional=True, backend=backend)
        self.bridge = nn.Linear(2 * H, H)
        self.tgt_embedding = nn.Embedding(tgt_vocab_size, embed_dim, padding_idx=PAD_ID)
        self.attention = AdditiveAttention(2 * H, H, attention_size, backend=backend)
        self.decoder = GRU(embed_dim + 2 * H, H, batch_first=True, backend=backend)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(H + 2 * H + embed_dim, tgt_vocab_size)

    # -- the parts export uses: encode once, then one decoder step at a time ------------

    def encode(self, src_ids: Tensor, src_lengths: Tensor | None = None):
        """src_ids [B, S] -> (memory [B, S, 2H], memory_keys [B, S, A] = W_k memory,
        src_lengths [B], initial decoder state [B, H])."""
        check_tokens(src_ids, src_lengths, "src_ids", self.src_embedding.num_embeddings)
        if src_lengths is None:
            src_lengths = lengths_from_padding(src_ids, PAD_ID)
        memory, h_n = run_embedded(self.encoder, self.src_embedding, src_ids, src_lengths, self.dropout)
        state = torch.tanh(self.bridge(torch.cat([h_n[0], h_n[1]], dim=1)))
        return memory, self.attention.W_k(memory), src_lengths, state

    def step(self, prev_tokens: Tensor, state: Tensor, memory: Tensor, memory_keys: Tensor,
             src_lengths: Tensor):
        """One decoder step. prev_tokens [B] int64, state [B, H] -> (logits [B, V],
        new state [B, H], attention weights [B, S])."""
        emb = self.dropout(self.tgt_embedding(prev_tokens))                   # [B, E]
        context, weights = functional.additive_attention(
            self.attention.W_q(state).unsqueeze(1), memory_keys, self.attention.w_v.weight.view(-1),
            memory, src_lengths, backend=self.attention.backend)              # [B, 1, 2H], [B, 1, S]
        context = context.squeeze(1)
        x = torch.cat([emb, context], dim=1).unsqueeze(1)                     # [B, 1, E+2H]
        _, h = self.decoder(x, state.unsqueeze(0).contiguous())
        state = h.squeeze(0)
        logits = self.out(self.dropout(torch.cat([state, context, emb], dim=1)))
        return logits, state, weights.squeeze(1)

    # -- training and decoding -------------------------------------------------------

    def forward(self, src_ids: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing. tgt_in [B, T]: <bos> then the target tokens (padded).
        Returns (logits [B, T, V], attention weights [B, T, S])."""
        check_tokens(tgt_in, None, "tgt_in", self.tgt_embedding.num_embeddings)
        memory, keys, src_lengths, state = self.encode(src_ids, src_lengths)
        if tgt_in.shape[0] != src_ids.shape[0]:
            raise ValueError(f"tgt_in must have the batch size of src_ids ({src_ids.shape[0]}), got "
                             f"{tgt_in.shape[0]}")
        logits, weights = [], []
        for t in range(tgt_in.shape[1]):
            step_logits, state, w = self.step(tgt_in[:, t], state, memory, keys, src_lengths)
            logits.append(step_logits)
            weights.append(w)
        return torch.stack(logits, 1), torch.stack(weights, 1)

    @torch.no_grad()
    def greedy_decode(self, src_ids: Tensor, src_lengths: Tensor | None = None,
                      max_len: int | None = None) -> tuple[list[list[int]], Tensor]:
        """-> (token ids per row without <bos>/<eos>, attention weights [B, L, S])."""
        max_len = self.config["max_decode_len"] if max_len is None else max_len
        memory, keys, src_lengths, state = self.encode(src_ids, src_lengths)
        return greedy_loop(lambda prev, state: self.step(prev, state, memory, keys, src_lengths),
                           state, src_ids.shape[0], max_len, BOS_ID, EOS_ID, src_ids.device)

    def export_plan(self):
        """Two graphs for seqfuse.export: the encoder and a one-step decoder."""
        from ..plans import seq2seq_plan

        return seq2seq_plan(self)
