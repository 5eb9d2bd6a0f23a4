"""Concurrency of the seqfuse modules (LSTM, GRU, RNN forward and gradients, additive
attention, MultiheadAttention) and of a zoo model built on them, called from several
Python threads at once: the same answers as serially, bit for bit (threads_common.py).
"""
import pytest

from conftest import requires_native

from .threads_common import run_threaded

RECURRENT = """
    torch.manual_seed(0)
    modules = {
        "lstm": seqfuse.nn.LSTM(7, 9, num_layers=2, bidirectional=True, batch_first=True, backend="native"),
        "gru": seqfuse.nn.GRU(7, 9, bidirectional=True, batch_first=True, backend="native"),
        "rnn": seqfuse.nn.RNN(7, 9, batch_first=True, backend="native"),
    }
    calls = []
    for kind, m in modules.items():
        for B, T in [(1, 5), (3, 17), (8, 40), (5, 1)]:
            g = torch.Generator().manual_seed(B * 100 + T)
            x = torch.randn(B, T, 7, generator=g)
            lengths = torch.randint(1, T + 1, (B,), generator=g)
            lengths[0] = T
            calls.append(lambda m=m, x=x, lengths=lengths: (m(x, lengths=lengths)[0],))
            # training: gradients w.r.t. input and weights, without accumulating into .grad
            def grads(m=m, x=x, lengths=lengths):
                xr = x.clone().requires_grad_()
                y = m(xr, lengths=lengths)[0]
                return torch.autograd.grad(y.square().sum(), [xr, *m.parameters()])
            calls.append(grads)
    check("recurrent", calls)
"""

ATTENTION = """
    torch.manual_seed(0)
    add = seqfuse.nn.AdditiveAttention(6, 5, 4, backend="native")
    mha = seqfuse.nn.MultiheadAttention(8, 2, batch_first=True, backend="native")
    calls = []
    for B, Q, K in [(1, 1, 3), (4, 7, 9), (2, 33, 65)]:
        g = torch.Generator().manual_seed(Q * 10 + K)
        q, k, v = torch.randn(B, Q, 5, generator=g), torch.randn(B, K, 6, generator=g), torch.randn(B, K, 3, generator=g)
        lens = torch.randint(0, K + 1, (B,), generator=g)      # 0: a fully masked row
        calls.append(lambda q=q, k=k, v=v, lens=lens: (add(q, k, v, lens),))
        x = torch.randn(B, K, 8, generator=g)
        pad = torch.arange(K)[None] >= torch.randint(1, K + 1, (B,), generator=g)[:, None]
        calls.append(lambda x=x, pad=pad: (mha(x, x, x, key_padding_mask=pad, need_weights=False)[0],))
        def grads(q=q, k=k, v=v, lens=lens):
            qr = q.clone().requires_grad_()
            return torch.autograd.grad(add(qr, k, v, lens).sum(), [qr, *add.parameters()])
        calls.append(grads)
    check("attention", calls)
"""

ZOO = """
    from seqfuse.zoo.models import MODELS
    torch.manual_seed(0)
    model = MODELS["bilstm-attention"](vocab_size=50, embed_dim=8, hidden_size=12, num_classes=3,
                                       attention_size=6).eval()
    calls = []
    for B, T in [(1, 4), (6, 23), (16, 64)]:
        g = torch.Generator().manual_seed(B + T)
        ids = torch.randint(1, 50, (B, T), generator=g)
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        def run(ids=ids, lengths=lengths):
            with torch.inference_mode():
                out = model(ids, lengths)
            return out if isinstance(out, tuple) else (out,)
        calls.append(run)
    check("zoo bilstm-attention", calls)
"""


@requires_native
@pytest.mark.parametrize("torch_threads", [1, 2])
@pytest.mark.parametrize("body", [RECURRENT, ATTENTION, ZOO], ids=["recurrent", "attention", "zoo"])
def test_modules_from_threads_equal_serial(body, torch_threads):
    out = run_threaded(body, torch_threads)
    assert "concurrent calls equal to serial" in out
