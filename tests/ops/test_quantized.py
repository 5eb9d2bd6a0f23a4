"""int8 dynamically quantised LSTM and GRU (ops.quantized_rnn_layer, seqfuse.quantize_dynamic).

The op is compared with reference.quantized_rnn_layer, which does the kernel's arithmetic
in torch ops (int8 products summed exactly, float32 scales and cell), under every CPU
capability this machine runs (VNNI on avx512_bf16/amx, plain int32 loops elsewhere). The two
differ only where the cell's float32 math (fast sigmoid/tanh against torch's) moves an
activation across a rounding boundary of the next step's quantisation: one step of one
activation, about |w| / 127, so outputs agree to 2e-3 and on average to 1e-5. The modules
are compared with the float32 layers they came from, within int8's own error.
"""
import pytest
import torch
from conftest import requires_native

import seqfuse
from seqfuse import ops, reference
from seqfuse.nn import QuantizedGRU, QuantizedLSTM, quantize_dynamic
from seqfuse.nn.quantized import quantize_weight


@pytest.fixture(params=seqfuse.cpu_capabilities() or ["none"])
def capability(request):
    if request.param == "none":
        yield "none"
        return
    previous = seqfuse.set_cpu_capability(request.param)
    yield request.param
    seqfuse.set_cpu_capability(previous)


def _case(mode, D, B, T=6, I=5, H=19, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = (4 if mode == "lstm" else 3) * H
    w_ih, s_ih = quantize_weight(torch.randn(D, G, I, generator=g) * 0.4)
    w_hh, s_hh = quantize_weight(torch.randn(D, G, H, generator=g) * 0.3)
    b_ih = torch.randn(D, G, generator=g) * 0.1 if bias else None
    b_hh = torch.randn(D, G, generator=g) * 0.1 if bias and mode == "gru" else None
    x = torch.randn(T, B, I, generator=g)
    hx = torch.randn(D, B, H, generator=g) * 0.5
    cx = torch.randn(D, B, H, generator=g) * 0.5 if mode == "lstm" else None
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = 1
    lengths[-1] = T
    return [mode, x, w_ih, s_ih, w_hh, s_hh, b_ih, b_hh, hx, cx], lengths


def _agree(got, want):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"output {i}: {g.shape} vs {w.shape}"
        if not w.numel():
            continue
        diff = (g - w).abs()
        assert diff.max().item() <= 2e-3, f"output {i}: max {diff.max().item():.2e}"
        assert diff.mean().item() <= 1e-5, f"output {i}: mean {diff.mean().item():.2e}"


@requires_native
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("D,B", [(1, 1), (2, 7), (1, 37)])
def test_op_matches_the_reference(capability, mode, D, B):
    args, lengths = _case(mode, D, B)
    with torch.no_grad():
        _agree(ops.quantized_rnn_layer(*args, lengths), reference.quantized_rnn_layer(*args, lengths))
        _agree(ops.quantized_rnn_layer(*args, None), reference.quantized_rnn_layer(*args, None))
    args, lengths = _case(mode, D, B, I=64, H=48, bias=False, seed=1)  # whole unit blocks, no bias
    with torch.no_grad():
        _agree(ops.quantized_rnn_layer(*args, lengths), reference.quantized_rnn_layer(*args, lengths))


@requires_native
def test_padding_is_zero_and_states_stop_at_each_length():
    args, lengths = _case("lstm", 2, 5, T=7)
    out, h_n, c_n = ops.quantized_rnn_layer(*args, lengths)
    H = args[4].shape[2]
    for b, L in enumerate(lengths.tolist()):
        assert (out[L:, b] == 0).all()
        assert torch.equal(h_n[0, b], out[L - 1, b, :H])  # forward: last valid step
        assert torch.equal(h_n[1, b], out[0, b, H:])       # reverse: step 0


@pytest.mark.parametrize("cls,torch_cls", [(QuantizedLSTM, torch.nn.LSTM), (QuantizedGRU, torch.nn.GRU)])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_module_is_close_to_its_float_layer(cls, torch_cls, bidirectional):
    torch.manual_seed(0)
    ref = torch_cls(24, 32, num_layers=2, bidirectional=bidirectional, batch_first=True).eval()
    q = cls(ref)
    x = torch.randn(5, 9, 24)
    with torch.no_grad():
        got, want = q(x), ref(x)
    out_err = (got[0] - want[0]).abs().max().item()
    assert out_err < 0.05, out_err  # int8 weights and activations: ~1% of the range
    assert out_err > 0  # it is quantised
    states = zip(got[1], want[1]) if isinstance(want[1], tuple) else [(got[1], want[1])]
    for g, w in states:
        assert g.shape == w.shape and (g - w).abs().max().item() < 0.05


def test_packed_input_and_initial_state():
    torch.manual_seed(1)
    ref = torch.nn.LSTM(6, 10).eval()
    q = QuantizedLSTM(ref)
    x = torch.randn(7, 4, 6)
    lengths = torch.tensor([3, 7, 1, 5])
    h0, c0 = torch.randn(1, 4, 10), torch.randn(1, 4, 10)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    with torch.no_grad():
        out_p, (h_p, c_p) = q(packed, (h0, c0))
        padded, _ = torch.nn.utils.rnn.pad_packed_sequence(out_p)
        ref_out, (ref_h, _) = ref(packed, (h0, c0))
        ref_padded, _ = torch.nn.utils.rnn.pad_packed_sequence(ref_out)
    assert (padded - ref_padded).abs().max() < 0.05
    assert (h_p - ref_h).abs().max() < 0.05


def test_quantize_dynamic_swaps_recurrent_layers_and_leaves_the_model():
    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.rnn = torch.nn.LSTM(16, 20, batch_first=True, bidirectional=True)
            self.gru = seqfuse.nn.GRU(40, 12, batch_first=True)
            self.proj = torch.nn.LSTM(12, 8, proj_size=4, batch_first=True)
            self.head = torch.nn.Linear(4, 3)

        def forward(self, tokens):
            y, _ = self.rnn(self.emb(tokens))
            y, _ = self.gru(y)
            y, _ = self.proj(y)
            return self.head(y[:, -1])

    torch.manual_seed(2)
    model = Classifier().eval()
    tokens = torch.randint(0, 50, (3, 11))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_dynamic(model)
    assert isinstance(q.rnn, QuantizedLSTM) and isinstance(q.gru, QuantizedGRU)
    assert isinstance(q.proj, torch.nn.LSTM)  # proj_size: no int8 kernel, stays float
    assert isinstance(model.rnn, torch.nn.LSTM)  # the original is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert q.rnn.weight_ih_l0.dtype == torch.int8
    with torch.no_grad():
        assert (q(tokens) - model(tokens)).abs().max() < 0.05
    loaded = quantize_dynamic(model)
    loaded.load_state_dict(q.state_dict())  # buffers round-trip
    with torch.no_grad():
        assert torch.equal(loaded(tokens), q(tokens))


def test_errors_name_the_argument():
    args, lengths = _case("lstm", 1, 3)
    x = args[1]
    with pytest.raises(NotImplementedError, match="has no backward"):
        ops.quantized_rnn_layer("lstm", x.clone().requires_grad_(), *args[2:], lengths)
    if ("quantized_rnn_layer", "cpu") not in ops.NATIVE_KERNELS:
        return
    with torch.no_grad():
        bad = list(args)
        bad[2] = args[2].float()
        with pytest.raises(RuntimeError, match="weight_ih must be an int8 CPU tensor"):
            ops.quantized_rnn_layer(*bad, lengths)
        nan = x.clone()
        nan[0, 0, 0] = float("nan")
        with pytest.raises(RuntimeError, match="input has NaN or Inf"):
            ops.quantized_rnn_layer("lstm", nan, *args[2:], lengths)
        with pytest.raises(RuntimeError, match="mode must be 'lstm' or 'gru'"):
            ops.quantized_rnn_layer("rnn", *args[1:], lengths)
        with pytest.raises(RuntimeError, match="every length must be <= T=6"):
            ops.quantized_rnn_layer(*args, torch.tensor([1, 2, 9]))
        with pytest.raises(RuntimeError, match="bias_hh must be None"):
            ops.quantized_rnn_layer("lstm", *args[1:7], args[6], *args[8:], lengths)
        zero_scale = list(args)
        zero_scale[3] = torch.zeros_like(args[3])
        with pytest.raises(RuntimeError, match="scale_ih must be finite and positive"):
            ops.quantized_rnn_layer(*zero_scale, lengths)
    q = QuantizedGRU(torch.nn.GRU(4, 5))
    with pytest.raises(ValueError, match="input.size\\(-1\\) must be 4"):
        q(torch.randn(3, 2, 6))
    with pytest.raises(TypeError, match="input must be float32"):
        q(torch.randn(3, 2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="proj_size has no int8 kernel"):
        QuantizedLSTM(torch.nn.LSTM(4, 6, proj_size=3))


def test_lengths_keyword_as_seqfuse_layers_take_it():
    torch.manual_seed(3)
    ref = seqfuse.nn.GRU(6, 10, batch_first=True, bidirectional=True).eval()
    q = quantize_dynamic(ref)
    x, lengths = torch.randn(4, 7, 6), torch.tensor([3, 7, 1, 5])
    with torch.no_grad():
        out, h = q(x, lengths=lengths)
        ref_out, ref_h = ref(x, lengths=lengths)
    assert (out - ref_out).abs().max() < 0.05 and (h - ref_h).abs().max() < 0.05
    assert (out[2, 1:] == 0).all()
    with pytest.raises(ValueError, match="lengths must be an int64 tensor"):
        q(x, lengths=lengths.int())
