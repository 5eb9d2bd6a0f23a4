"""seqfuse's modules with the backend as a parameter: the drop-ins give torch's answers
(outputs and gradients) whichever backend runs their ops, and the backend is chosen and
refused the way backend.py says. Triton runs on the GPU when there is one, else on CPU
tensors under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1): small
shapes only."""
import pytest
import torch
from conftest import BACKEND_DEVICE, backend_params

import seqfuse
from seqfuse import backend as backend_mod


def _grads(outputs, inputs, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ups = [torch.randn(o.shape, generator=g).to(o) for o in outputs]
    return torch.autograd.grad(outputs, inputs, ups, allow_unused=True)


def _assert_all_close(got, want, atol, rtol, names):
    for g, w, name in zip(got, want, names, strict=True):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", backend_params("native", "triton", "reference"))
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_recurrent_module_matches_torch(kind, backend, device):
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(6, 20, num_layers=2, bidirectional=True).to(device)
    m = getattr(seqfuse.nn, kind)(6, 20, num_layers=2, bidirectional=True, backend=backend)
    m = m.to(device)
    m.load_state_dict(ref.state_dict())
    lengths = torch.tensor([5, 1, 3])
    x = torch.randn(5, 3, 6, device=device, requires_grad=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    y_ref, h_ref = ref(packed)
    y_ref, _ = torch.nn.utils.rnn.pad_packed_sequence(y_ref, total_length=5)
    y, h = m(x, lengths=lengths)
    h, h_ref = (h[0], h_ref[0]) if kind == "LSTM" else (h, h_ref)
    _assert_all_close([y, h], [y_ref, h_ref], 1e-5, 0, ["output", "h_n"])
    params = [x] + list(m.parameters())
    ref_params = [x] + list(ref.parameters())
    got = _grads([y, h], params)
    want = _grads([y_ref, h_ref], ref_params)
    names = ["input"] + [n for n, _ in m.named_parameters()]
    _assert_all_close(got, want, 1e-5, 1e-4, names)


@pytest.mark.parametrize("backend", backend_params("native", "triton", op="additive_attention"))
def test_additive_attention_module_matches_reference(backend, device):
    torch.manual_seed(0)
    m = seqfuse.nn.AdditiveAttention(10, 12, 20, dropout=0.0, backend=backend).to(device)
    ref = seqfuse.nn.AdditiveAttention(10, 12, 20, dropout=0.0, backend="reference").to(device)
    ref.load_state_dict(m.state_dict())
    q = torch.randn(2, 3, 12, device=device, requires_grad=True)
    k = torch.randn(2, 17, 10, device=device, requires_grad=True)
    v = torch.randn(2, 17, 9, device=device, requires_grad=True)
    lens = torch.tensor([17, 0], device=device)  # the second row has no valid key
    y, y_ref = m(q, k, v, lens), ref(q, k, v, lens)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    assert torch.all(y[1] == 0)
    torch.testing.assert_close(m.attention_weights, ref.attention_weights, atol=1e-6, rtol=0)
    names = ["q", "k", "v"] + [n for n, _ in m.named_parameters()]
    got = _grads([y], [q, k, v, *m.parameters()])
    want = _grads([y_ref], [q, k, v, *ref.parameters()])
    _assert_all_close(got, want, 1e-5, 1e-4, names)


@pytest.mark.parametrize("backend", backend_params(
    "native", "triton", op="scaled_dot_product_attention"))
def test_multihead_attention_matches_torch(backend, device):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(16, 2, batch_first=True).to(device).eval()
    m = seqfuse.nn.MultiheadAttention(16, 2, batch_first=True, backend=backend).to(device).eval()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 19, 16, device=device, requires_grad=True)
    pad = torch.arange(19, device=device)[None] >= torch.tensor([[19], [4]], device=device)
    y, _ = m(x, x, x, key_padding_mask=pad, need_weights=False)
    y_ref, _ = ref(x, x, x, key_padding_mask=pad, need_weights=False)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    got, want = _grads([y], [x]), _grads([y_ref], [x])
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# Choosing the backend
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params("triton", op="gru_layer"))
def test_use_backend_context_selects_triton(backend, device):
    m = seqfuse.nn.GRU(4, 16).to(device)
    x = torch.randn(3, 2, 4, device=device)
    with seqfuse.use_backend("reference"):
        y_ref = m(x)[0]
    with seqfuse.use_backend(backend):
        assert backend_mod.resolve(m.backend, "gru_layer", device) == "triton"
        y = m(x)[0]
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    assert "triton" in seqfuse.available_backends(device)


@pytest.mark.parametrize("backend", backend_params("triton"))
def test_triton_refused_with_reason(backend, monkeypatch):
    m = seqfuse.nn.LSTM(4, 8, backend=backend)
    if BACKEND_DEVICE[backend] == "cpu":
        # On CPU tensors only the interpreter can run Triton: without it, a clear error.
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="backend 'triton' cannot run lstm_layer on 'cpu'.*"
                                               "TRITON_INTERPRET=1"):
            m(torch.randn(2, 1, 4))
    with pytest.raises(RuntimeError, match="do not run on device type 'meta'"):
        backend_mod.resolve(backend, "lstm_layer", "meta")


def test_auto_never_picks_the_interpreter():
    # "auto" on CPU is the C++ kernel (or the reference), never Triton's slow interpreter.
    assert backend_mod.resolve("auto", "lstm_layer", "cpu") in ("native", "reference")
