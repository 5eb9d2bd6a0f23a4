"""Fixed cost of a seqfuse module call: the same inference call timed at four depths, so
that the differences are the layers' costs (issue 22's "at most 30 us above the kernel").

  module              seqfuse.nn.LSTM(x, lengths=...) under inference_mode (the user's call:
                      checks, backend choice, the cached stacked weights, the op)
  op, packed          torch.ops.seqfuse.lstm_layer on the module's cached stacked weights
                      and tile panels (packed_weights): the kernel alone, as the module runs it
  op                  the same without packed_weights: the kernel packs its panels every call
  module, no cache    the module with its weight cache bypassed: it stacks both
                      directions' weights every call, as before the cache
  eager               torch.nn.LSTM with the same weights (the group's baseline)

Groups: percall-lstm-cpu-{shape}, at the demo's shape (B1, T16, H128, bidirectional, 64
input features) and at the layer shape of issue 22 (B1, T64, H128, one direction).

Token groups, percall-tokens-lstm-cpu-{shape} (an embedding of 20000 x 64 feeding the layer,
as in the demo's model):
  eager               nn.Embedding then torch.nn.LSTM (the baseline)
  module              seqfuse.nn.LSTM over the embedded input (the first layer multiplies
                      by W_ih every call)
  module, folded      LSTM.forward_tokens: the first layer reads rows of the folded table
                      E W_ih^T + b (built once)
  op, projected       the folded table's rows gathered, then lstm_layer_projected on the
                      cached panels of W_hh: the folded path's kernel alone
"""
import time

import pytest
import torch
from conftest import cases, record, require_device, rounds_for, timed

import seqfuse

IMPLS = ["eager", "module", "op, packed", "op", "module, no cache"]
# (B, T, I, H, bidirectional)
FULL = [(1, 16, 64, 128, True), (1, 64, 128, 128, False)]
QUICK = [(1, 3, 4, 5, True)]


def _id(case):
    B, T, I, H, bi = case
    return f"B{B}-T{T}-I{I}-H{H}-{'bi' if bi else 'uni'}"


@cases(full=FULL, quick=QUICK, ids=_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_percall(benchmark, impl, case):
    require_device("cpu")
    if not seqfuse.ops.has_native_kernel("lstm_layer", "cpu"):
        pytest.skip("seqfuse._C was not built with CPU kernels")
    B, T, I, H, bi = case
    torch.manual_seed(0)
    eager = torch.nn.LSTM(I, H, batch_first=True, bidirectional=bi).eval()
    module = seqfuse.nn.LSTM(I, H, batch_first=True, bidirectional=bi, backend="native").eval()
    module.load_state_dict(eager.state_dict())
    x = torch.randn(B, T, I)
    lengths = torch.full((B,), T, dtype=torch.int64)
    record(benchmark, f"percall-lstm-cpu-{_id(case)}", impl, _id(case), batch=B, tokens=B * T)
    D = 2 if bi else 1
    h0 = torch.zeros(D, B, H)
    with torch.no_grad():
        weights = module._op_weights(0)  # the cached ones the module passes
        packed = module._weight_cache[0][3]  # and the panels it passes with them
    op = torch.ops.seqfuse.lstm_layer.default
    xt = x.transpose(0, 1).contiguous()
    if impl == "eager":
        def fn():
            return eager(x)[0]
    elif impl == "module":
        def fn():
            return module(x, lengths=lengths)[0]
    elif impl == "op, packed":
        def fn():
            return op(xt, *weights, h0, h0, lengths, False, packed)[0].transpose(0, 1)
    elif impl == "op":
        def fn():
            return op(xt, *weights, h0, h0, lengths, False)[0].transpose(0, 1)
    else:
        module._op_weights = module._stack_weights  # this instance only: no cache

        def fn():
            return module(x, lengths=lengths)[0]

    def call():
        with torch.inference_mode():
            return fn()

    with torch.inference_mode():
        torch.testing.assert_close(call(), eager(x)[0], atol=1e-5, rtol=0)
    t0 = time.perf_counter()
    call()
    timed(benchmark, call, max(rounds_for(time.perf_counter() - t0), 200))


TOKEN_IMPLS = ["eager", "module", "module, folded", "op, projected"]
TOKEN_FULL = [(1, 16, 64, 128, True), (1, 64, 64, 128, True)]
VOCAB = 20000


@cases(full=TOKEN_FULL, quick=QUICK, ids=_id)
@pytest.mark.parametrize("impl", TOKEN_IMPLS)
def test_percall_tokens(benchmark, impl, case):
    require_device("cpu")
    if not seqfuse.ops.has_native_kernel("lstm_layer_projected", "cpu"):
        pytest.skip("seqfuse._C was not built with CPU kernels")
    B, T, I, H, bi = case
    torch.manual_seed(0)
    emb = torch.nn.Embedding(VOCAB, I)
    eager = torch.nn.LSTM(I, H, batch_first=True, bidirectional=bi).eval()
    module = seqfuse.nn.LSTM(I, H, batch_first=True, bidirectional=bi, backend="native").eval()
    module.load_state_dict(eager.state_dict())
    ids = torch.randint(0, VOCAB, (B, T))
    lengths = torch.full((B,), T, dtype=torch.int64)
    record(benchmark, f"percall-tokens-lstm-cpu-{_id(case)}", impl, _id(case), batch=B,
           tokens=B * T)
    D = 2 if bi else 1
    h0 = torch.zeros(D, B, H)
    with torch.no_grad():
        table, w_hh, _, packed = module._folded_table(emb, ids)
    op = torch.ops.seqfuse.lstm_layer_projected.default
    if impl == "eager":
        def fn():
            return eager(emb(ids))[0]
    elif impl == "module":
        def fn():
            return module(emb(ids), lengths=lengths)[0]
    elif impl == "module, folded":
        def fn():
            return module.forward_tokens(emb, ids, lengths=lengths)[0]
    else:
        def fn():
            proj = table.index_select(0, ids.t().reshape(-1)).view(T, B, D, -1)
            return op(proj, w_hh, h0, h0, lengths, packed)[0].transpose(0, 1)

    def call():
        with torch.inference_mode():
            return fn()

    with torch.inference_mode():
        torch.testing.assert_close(call(), eager(emb(ids))[0], atol=1e-5, rtol=0)
    t0 = time.perf_counter()
    call()
    timed(benchmark, call, max(rounds_for(time.perf_counter() - t0), 200))
