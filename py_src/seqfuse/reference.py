"""Pure-PyTorch implementations of seqfuse's ops: the "reference" backend and the
oracle of the tests. Same arguments and results as the compiled ops (see ops.py),
written for clarity, one time step at a time.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _reverse_within_lengths(x: Tensor, lengths: Tensor) -> Tensor:
    """x: [T, B, ...] -> each column's first lengths[b] steps reversed, padding kept in place."""
    T = x.shape[0]
    t = torch.arange(T, device=x.device).unsqueeze(1)  # [T, 1]
    lens = lengths.to(x.device).unsqueeze(0)  # [1, B]
    idx = torch.where(t < lens, lens - 1 - t, t)  # [T, B]
    idx = idx.view(T, -1, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(0, idx)


def lstm_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None,
    hx: Tensor, cx: Tensor, lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference for ops.lstm_layer: input [T, B, I], weight_ih [D, 4H, I], weight_hh
    [D, 4H, H], bias [D, 4H] | None, hx/cx [D, B, H], lengths [B] | None.
    Returns output [T, B, D*H], h_n [D, B, H], c_n [D, B, H]."""
    T, B, _ = input.shape
    D = weight_ih.shape[0]
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long)
    valid = torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)  # [T, B]
    valid = valid.to(input.device).unsqueeze(-1)  # [T, B, 1]
    outputs, h_ns, c_ns = [], [], []
    for d in range(D):
        x = input if d == 0 else _reverse_within_lengths(input, lengths)
        proj = x @ weight_ih[d].t()
        if bias is not None:
            proj = proj + bias[d]
        h, c = hx[d], cx[d]
        steps = []
        for t in range(T):
            i, f, g, o = (proj[t] + h @ weight_hh[d].t()).chunk(4, dim=1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            h = torch.where(valid[t], h_new, h)
            c = torch.where(valid[t], c_new, c)
            steps.append(torch.where(valid[t], h_new, torch.zeros_like(h_new)))
        out = torch.stack(steps)
        if d == 1:
            out = _reverse_within_lengths(out, lengths)
        outputs.append(out)
        h_ns.append(h)
        c_ns.append(c)
    return torch.cat(outputs, dim=2), torch.stack(h_ns), torch.stack(c_ns)
