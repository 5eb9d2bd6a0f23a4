"""One check layer: the same bad call to every available backend (native C++, Triton under
the interpreter, the eager reference) raises the same exception type with the same
message, forward and backward ops alike. The messages are the C++ TORCH_CHECKs';
seqfuse.ops.checks repeats them for the Python backends."""
import math

import pytest
import torch

from seqfuse import functional as F
from seqfuse.backend import available_backends

BACKENDS = available_backends("cpu")
T, B, I, H = 5, 3, 4, 6


def _lengths(*v):
    return torch.tensor(v, dtype=torch.int64)


def layer_args(kind: str, **overrides):
    """Good arguments of one layer op (LSTM, GRU or RNN), with some replaced."""
    G = {"lstm": 4, "gru": 3, "rnn": 1}[kind] * H
    a = dict(input=torch.randn(T, B, I), weight_ih=torch.randn(1, G, I),
             weight_hh=torch.randn(1, G, H), hx=torch.zeros(1, B, H), lengths=_lengths(5, 2, 1))
    if kind == "lstm":
        a.update(bias=torch.randn(1, G), cx=torch.zeros(1, B, H))
    elif kind == "gru":
        a.update(bias_ih=torch.randn(1, G), bias_hh=torch.randn(1, G))
    else:
        a.update(bias=torch.randn(1, G))
    a.update(overrides)
    return a


LAYER_CASES = [
    ("input-2d", {"input": torch.randn(T, I)}, "input must be 3-D [T, B, I], got 2-D with shape [5, 4]"),
    ("no-steps", {"input": torch.randn(0, B, I)}, "input must have at least one time step, got T=0"),
    ("three-directions", {"weight_ih": lambda G: torch.randn(3, G, I)}, "weight_ih must be [D, "),
    ("weight_hh-shape", {"weight_hh": lambda G: torch.randn(1, G, H + 1)}, "weight_hh must be [D=1, "),
    ("weight_ih-features", {"weight_ih": lambda G: torch.randn(1, G, I + 2)},
     "for input features I=4 and hidden size H=6, got"),
    ("hx-shape", {"hx": torch.zeros(1, B + 1, H)}, "hx must be [1, 3, 6], got [1, 4, 6]"),
    ("weight_hh-dtype", {"weight_hh": lambda G: torch.randn(1, G, H, dtype=torch.float64)},
     "weight_hh must have the input's dtype torch.float32, got torch.float64"),
    ("hx-dtype", {"hx": torch.zeros(1, B, H, dtype=torch.float64)},
     "hx must have the input's dtype torch.float32, got torch.float64"),
    ("lengths-int32", {"lengths": torch.tensor([5, 2, 1], dtype=torch.int32)},
     "lengths must be int64, got torch.int32"),
    ("lengths-shape", {"lengths": _lengths(5, 2)}, "lengths must be [B=3], got shape [2]"),
    ("lengths-zero", {"lengths": _lengths(5, 0, 1)}, "every length must be >= 1, got min(lengths)=0"),
    ("lengths-past-T", {"lengths": _lengths(5, 9, 1)}, "every length must be <= T=5, got max(lengths)=9"),
]


def _resolve(kind, overrides):
    G = {"lstm": 4, "gru": 3, "rnn": 1}[kind] * H
    return {k: (v(G) if callable(v) else v) for k, v in overrides.items()}


def call_layer(kind: str, backend: str, a: dict, nonlinearity="tanh"):
    if kind == "lstm":
        return F.lstm_layer(a["input"], a["weight_ih"], a["weight_hh"], a["bias"], a["hx"], a["cx"],
                            a["lengths"], backend=backend)
    if kind == "gru":
        return F.gru_layer(a["input"], a["weight_ih"], a["weight_hh"], a["bias_ih"], a["bias_hh"],
                           a["hx"], a["lengths"], backend=backend)
    return F.rnn_layer(a["input"], a["weight_ih"], a["weight_hh"], a["bias"], a["hx"], a["lengths"],
                       nonlinearity, backend=backend)


def outcome(fn):
    """(exception type, message) of fn(), or None when it succeeds."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001  (the type is what is compared)
        return type(exc), str(exc).split("\n")[0]
    return None


def assert_same_everywhere(results: dict, op: str, expected: str):
    """results: backend -> outcome. Every backend raised, alike: RuntimeError("{op}: ...")
    with `expected` in the message."""
    assert len(BACKENDS) >= 2, f"only {BACKENDS}: nothing to compare"
    for backend, got in results.items():
        assert got is not None, f"{backend} accepted the bad call"
        assert got[0] is RuntimeError, f"{backend} raised {got[0].__name__}: {got[1]}"
        assert got[1].startswith(f"{op}: ") and expected in got[1], \
            f"{backend}: {got[1]!r} lacks {op}: ...{expected!r}"
    first = next(iter(results.values()))
    assert all(got == first for got in results.values()), results


def test_the_backends_compared():
    assert "reference" in BACKENDS and "native" in BACKENDS, BACKENDS
    if "triton" not in BACKENDS:
        pytest.skip("triton is not installed or TRITON_INTERPRET is unset: only native and reference")


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("name,overrides,expected", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_layer_bad_call_fails_alike(kind, name, overrides, expected):
    a = layer_args(kind, **_resolve(kind, overrides))
    results = {b: outcome(lambda b=b: call_layer(kind, b, a)) for b in BACKENDS}
    assert_same_everywhere(results, f"{kind}_layer", expected)


def test_good_layer_call_passes_every_backend():
    for kind in ("lstm", "gru", "rnn"):
        a = layer_args(kind)
        outs = {b: call_layer(kind, b, a) for b in BACKENDS}
        ref = outs["reference"]
        for b, out in outs.items():
            for x, y in zip(out, ref):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=f"{kind} {b}")


def test_bias_and_nonlinearity_fail_alike():
    a = layer_args("gru", bias_hh=torch.randn(1, 3 * H + 1))
    assert_same_everywhere({b: outcome(lambda b=b: call_layer("gru", b, a)) for b in BACKENDS},
                           "gru_layer", "bias_hh must be [1, 18], got [1, 19]")
    a = layer_args("rnn")
    assert_same_everywhere({b: outcome(lambda b=b: call_layer("rnn", b, a, "sigmoid")) for b in BACKENDS},
                           "rnn_layer", "nonlinearity must be 'tanh' or 'relu', got 'sigmoid'")


# ---------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------

Bq, Q, K, A, Dv = 2, 3, 5, 4, 6


def additive(**o):
    a = dict(query=torch.randn(Bq, Q, A), key=torch.randn(Bq, K, A), w_v=torch.randn(A),
             value=torch.randn(Bq, K, Dv), valid_lens=torch.tensor([5, 2]), mask=None)
    a.update(o)
    return a


ADDITIVE_CASES = [
    ("query-2d", additive(query=torch.randn(Q, A)), "query must be 3-D [B, Q, A], got shape [3, 4]"),
    ("key-shape", additive(key=torch.randn(Bq, K, A + 1)), "key must be [B=2, K>=1, A=4], got shape [2, 5, 5]"),
    ("w_v-shape", additive(w_v=torch.randn(A, 1)), "w_v must be [A=4], got shape [4, 1]"),
    ("value-shape", additive(value=torch.randn(Bq, K + 1, Dv)), "value must be [B=2, K=5, Dv], got shape"),
    ("value-dtype", additive(value=torch.randn(Bq, K, Dv, dtype=torch.float64)),
     "value must have the query's dtype torch.float32, got torch.float64"),
    ("valid_lens-float", additive(valid_lens=torch.tensor([1.0, 2.0])),
     "valid_lens must be an integer tensor, got torch.float32"),
    ("valid_lens-shape", additive(valid_lens=torch.tensor([1, 2, 3])),
     "valid_lens must be [B=2] or [B, Q]=[2, 3], got shape [3]"),
    ("valid_lens-range", additive(valid_lens=torch.tensor([1, 9])),
     "valid_lens must be in [0, K=5], got values in [1, 9]"),
    ("mask-dtype", additive(mask=torch.ones(Bq, Q, K)), "mask must be bool (True = attend), got torch.float32"),
    ("mask-shape", additive(mask=torch.ones(Bq, Q, K + 1, dtype=torch.bool)),
     "mask must be broadcastable to [2, 3, 5], got shape [2, 3, 6]"),
]


@pytest.mark.parametrize("name,a,expected", ADDITIVE_CASES, ids=[c[0] for c in ADDITIVE_CASES])
def test_additive_bad_call_fails_alike(name, a, expected):
    results = {b: outcome(lambda b=b: F.additive_attention(**a, backend=b)) for b in BACKENDS}
    assert_same_everywhere(results, "additive_attention", expected)


Hh, D = 2, 4


def sdpa(**o):
    a = dict(query=torch.randn(Bq, Hh, Q, D), key=torch.randn(Bq, Hh, K, D),
             value=torch.randn(Bq, Hh, K, Dv), attn_mask=None, valid_lens=None, scale=None,
             dropout_p=0.0)
    a.update(o)
    return a


SDPA_CASES = [
    ("query-3d", sdpa(query=torch.randn(Bq, Q, D)), "query must be 4-D [B, H, Q, D], got shape [2, 3, 4]"),
    ("key-shape", sdpa(key=torch.randn(Bq, Hh, K, D + 1)),
     "key must be [B=2, H=2, K>=1, D=4], got shape [2, 2, 5, 5]"),
    ("value-shape", sdpa(value=torch.randn(Bq, Hh, K + 1, Dv)),
     "value must be [B=2, H=2, K=5, Dv>=1], got shape [2, 2, 6, 6]"),
    ("key-dtype", sdpa(key=torch.randn(Bq, Hh, K, D, dtype=torch.float64)),
     "key must have the query's dtype torch.float32, got torch.float64"),
    ("mask-int", sdpa(attn_mask=torch.ones(Q, K, dtype=torch.int64)),
     "attn_mask must be bool (True = attend) or floating (added to the scores), got torch.int64"),
    ("mask-shape", sdpa(attn_mask=torch.ones(Q, K + 1, dtype=torch.bool)),
     "attn_mask must be broadcastable to [2, 2, 3, 5], got shape [3, 6]"),
    ("valid_lens-range", sdpa(valid_lens=torch.tensor([-1, 2])), "valid_lens must be in [0, K=5], got values in [-1, 2]"),
    ("scale-nan", sdpa(scale=math.nan), "scale must be finite, got nan"),
    ("dropout-1", sdpa(dropout_p=1.0), "dropout_p must be in [0, 1), got 1"),
    ("dropout-1.5", sdpa(dropout_p=1.5), "dropout_p must be in [0, 1), got 1.5"),
]


@pytest.mark.parametrize("name,a,expected", SDPA_CASES, ids=[c[0] for c in SDPA_CASES])
def test_sdpa_bad_call_fails_alike(name, a, expected):
    results = {b: outcome(lambda b=b: F.scaled_dot_product_attention(**a, backend=b)) for b in BACKENDS}
    assert_same_everywhere(results, "scaled_dot_product_attention", expected)


# ---------------------------------------------------------------------------------
# Backward ops: the compiled op and its Triton twin share their checks and saved layouts
# ---------------------------------------------------------------------------------

def _twins(name: str) -> dict:
    ops = {"native": getattr(torch.ops.seqfuse, name).default}
    if "triton" in BACKENDS:
        import seqfuse.triton  # noqa: F401  (registers the _triton ops)

        ops["triton"] = getattr(torch.ops.seqfuse, name + "_triton").default
    return ops


def _assert_twins_alike(name: str, args: tuple, expected: str):
    results = {b: outcome(lambda op=op: op(*args)) for b, op in _twins(name).items()}
    if len(results) < 2:
        pytest.skip("no Triton backend to compare with")
    for b, got in results.items():
        assert got is not None and got[0] is RuntimeError and expected in got[1], (b, got)
    assert len(set(results.values())) == 1, results


def _lstm_forward():
    a = layer_args("lstm")
    args = (a["input"], a["weight_ih"], a["weight_hh"], a["bias"], a["hx"], a["cx"], a["lengths"], True)
    return a, torch.ops.seqfuse.lstm_layer.default(*args)


def test_lstm_backward_bad_grad_fails_alike():
    a, (out, h_n, c_n, gates, cells) = _lstm_forward()
    common = (a["input"], a["weight_ih"], a["weight_hh"], a["hx"], a["cx"], a["lengths"])
    bad_grad = (torch.zeros(T, B, H + 1), torch.zeros_like(h_n), torch.zeros_like(c_n))
    _assert_twins_alike("lstm_layer_backward", (*bad_grad, *common, out, gates, cells),
                        "lstm_layer_backward: grad_output must have shape [5, 3, 6], got [5, 3, 7]")
    grads = (torch.zeros_like(out), torch.zeros_like(h_n), torch.zeros_like(c_n))
    _assert_twins_alike("lstm_layer_backward", (*grads, *common, out, gates[:, :, :, :-1], cells),
                        "lstm_layer_backward: gates/cells must come from lstm_layer on the same input")


def test_sdpa_backward_takes_the_shared_softmax_stats_layout():
    a = sdpa()
    q, k, v = a["query"], a["key"], a["value"]
    out, stats = torch.ops.seqfuse.scaled_dot_product_attention.default(q, k, v, None, None, False,
                                                                        None, 0.0, 0)
    assert stats.shape == (Bq, Hh, Q, 2)  # (row max, log row sum), as Triton saves
    go = torch.randn_like(out)
    _assert_twins_alike("scaled_dot_product_attention_backward",
                        (go, q, k, v, None, None, out, stats[..., 0], False, None, 0.0, 0),
                        "scaled_dot_product_attention_backward: softmax_stats must be [2, 2, 3, 2], "
                        "got [2, 2, 3]")
    # The stats of either twin feed the other's backward: one layout.
    grads = {b: op(go, q, k, v, None, None, out, stats, False, None, 0.0, 0)
             for b, op in _twins("scaled_dot_product_attention_backward").items()}
    for b, g in grads.items():
        for x, y in zip(g, grads["native"]):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=b)
