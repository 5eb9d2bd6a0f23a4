"""Where a batch-1 module call goes, in one process (issue 22's "at most 30 us above the
kernel"), and what the prepacked weights save. Medians of 3000 perf_counter-timed calls
under inference_mode, 2 threads, float32:

  module        seqfuse.nn.LSTM(x) (checks, weight cache, the op on the cached panels)
  op, packed    torch.ops.seqfuse.lstm_layer on the cached weights and panels
  op            the same op packing its panels itself
  eager         torch.nn.LSTM

then the demo's model (lstm-classifier, BiLSTM 128 over a folded 20000 x 64 embedding) with
the panels cached and with pack_recurrent_weights switched off (the module then passes
none), alternating, three times each.

    .venv/bin/python bench/percall_breakdown.py
"""
import statistics
import time

import torch

import seqfuse
import seqfuse.nn.rnn as rnn
from seqfuse.zoo.models import MODELS

torch.set_num_threads(2)


def median_us(fn, n=3000):
    for _ in range(300):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        ts.append(time.perf_counter_ns() - t0)
    return statistics.median(ts) / 1e3


op = torch.ops.seqfuse.lstm_layer.default
for T, I, H, bi in [(16, 64, 128, True), (64, 128, 128, False)]:
    torch.manual_seed(0)
    m = seqfuse.nn.LSTM(I, H, bidirectional=bi, backend="native").eval()
    ref = torch.nn.LSTM(I, H, bidirectional=bi).eval()
    ref.load_state_dict(m.state_dict())
    x, D = torch.randn(T, 1, I), 2 if bi else 1
    h0 = torch.zeros(D, 1, H)
    with torch.inference_mode():
        m(x)
        w, packed = m._weight_cache[0][2], m._weight_cache[0][3]
        r = {"module": median_us(lambda: m(x)),
             "op, packed": median_us(lambda: op(x, *w, h0, h0, None, False, packed)),
             "op": median_us(lambda: op(x, *w, h0, h0, None, False)),
             "eager": median_us(lambda: ref(x))}
    print(f"B1 T{T} I{I} H{H} {'bi' if bi else 'uni'}: " + ", ".join(f"{k} {v:.1f} us" for k, v in r.items())
          + f"; module - op, packed = {r['module'] - r['op, packed']:.1f} us; eager / module = "
          f"{r['eager'] / r['module']:.2f}x")

torch.manual_seed(0)
model = MODELS["lstm-classifier"](vocab_size=20000, embed_dim=64, hidden_size=128, num_classes=2,
                                  bidirectional=True).eval()
pack = seqfuse.ops.pack_recurrent_weights
try:
    for T in (16, 64):
        ids, lengths = torch.randint(1, 20000, (1, T)), torch.tensor([T])
        for _ in range(3):
            r = {}
            for mode in ("panels cached", "packed every call"):
                rnn.ops.pack_recurrent_weights = pack if mode == "panels cached" else (lambda a, b: None)
                model.lstm.clear_weight_cache()
                with torch.inference_mode():
                    r[mode] = median_us(lambda: model(ids, lengths), 2000)
            print(f"demo model T{T}: " + ", ".join(f"{k} {v / 1e3:.3f} ms" for k, v in r.items()))
finally:
    rnn.ops.pack_recurrent_weights = pack
