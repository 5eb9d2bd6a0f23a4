"""Greedy decoding around any one-step decoder: the loop shared by eager models
(seqfuse.zoo's seq2seq) and exported decoder graphs served in onnxruntime
(seqfuse.export.OrtModel), so that both decode alike token for token."""
from __future__ import annotations

import torch
from torch import Tensor


def greedy_loop(step, state, batch: int, max_len: int, bos_id: int, eos_id: int,
                device=None) -> tuple[list[list[int]], Tensor]:
    """step(prev_tokens [B] int64, state) -> (logits [B, V], new state, attention weights
    [B, S]). Starts every row at `bos_id`, stops when every row has produced `eos_id` or
    after max_len steps. -> (ids per row without `eos_id`, weights [B, L, S])."""
    if isinstance(max_len, bool) or not hasattr(max_len, "__index__") or max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
    prev = torch.full((batch,), bos_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, weights = [], []
    for _ in range(max_len):
        logits, state, w = step(prev, state)
        prev = logits.argmax(1)
        tokens.append(prev)
        weights.append(w)
        done |= prev == eos_id
        if bool(done.all()):
            break
    out = []
    for row in torch.stack(tokens, 1).tolist():
        out.append(row[:row.index(eos_id)] if eos_id in row else row)
    return out, torch.stack(weights, 1)
