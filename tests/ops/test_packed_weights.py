"""packed_weights: every layer op and both projected ops, given pack_recurrent_weights of
their weights, skip the packing and give the bits they give without it, which match eager
PyTorch (seqfuse.reference) over the compiled kernels' shape grid (odd sizes, batch 1,
length-1 rows); what cannot be packed or used is refused with an error naming the argument;
the modules keep the panels in their weight cache and rebuild them with it."""
import pytest
import torch
from cases import KIND_IDS, KINDS, LAYER_SHAPES, TOL

import seqfuse
from seqfuse import functional, ops


@pytest.fixture(params=KINDS, ids=KIND_IDS)
def kind(request):
    return request.param


def _lengths(T, B):
    # a length-1 row and a full one, the rest random: padding positions are zero in both
    if B == 1:
        return [T]
    gen = torch.Generator().manual_seed(T * 31 + B)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0], lengths[-1] = 1, T
    return lengths.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=[f"T{s[0]}B{s[1]}I{s[2]}H{s[3]}" for s in LAYER_SHAPES])
def test_packed_gives_the_unpacked_bits_and_the_reference(kind, shape, D, lengths, dtype):
    T, B, I, H = shape
    torch.manual_seed(0)
    args = kind.make_args(T, B, I, H, D, dtype=dtype, lengths=_lengths(T, B) if lengths else None)
    with torch.no_grad():
        packed = ops.pack_recurrent_weights(args[1], args[2])
        plain = kind.op(*args)
        fast = kind.op(*args, packed_weights=packed)
        ref = kind.ref(*args)
    for a, b, r in zip(plain, fast, ref):
        assert torch.equal(a, b)
        torch.testing.assert_close(b, r, atol=TOL[dtype]["out_atol"], rtol=0)


@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_projected_ops_take_packed_weight_hh(cell, D):
    T, B, H = 6, 3, 21
    G = (4 if cell == "lstm" else 3) * H
    torch.manual_seed(1)
    proj, w_hh, hx = torch.randn(T, B, D, G), torch.randn(D, G, H) * H ** -0.5, torch.randn(D, B, H)
    lengths = torch.tensor([6, 1, 4])
    packed = ops.pack_recurrent_weights(w_hh.new_empty(D, G, 0), w_hh)
    if cell == "lstm":
        cx = torch.randn(D, B, H)
        plain = ops.lstm_layer_projected(proj, w_hh, hx, cx, lengths)
        fast = ops.lstm_layer_projected(proj, w_hh, hx, cx, lengths, packed)
    else:
        b_hh = torch.randn(D, G)
        plain = ops.gru_layer_projected(proj, w_hh, b_hh, hx, lengths)
        fast = ops.gru_layer_projected(proj, w_hh, b_hh, hx, lengths, packed)
    for a, b in zip(plain, fast):
        assert torch.equal(a, b)
    # The panels of a full weight_ih do not fit the projected ops (they read no input).
    full = ops.pack_recurrent_weights(torch.randn(D, G, 5), w_hh)
    with pytest.raises(RuntimeError, match="packed_weights must be pack_recurrent_weights"):
        if cell == "lstm":
            ops.lstm_layer_projected(proj, w_hh, hx, cx, lengths, full)
        else:
            ops.gru_layer_projected(proj, w_hh, b_hh, hx, lengths, full)


def _with_header(packed, index, value):
    bad = packed.clone()
    bad[index] = value
    return bad


def test_bad_packed_weights_are_refused(kind):
    torch.manual_seed(2)
    args = kind.make_args(5, 2, 7, 9, 2)
    packed = ops.pack_recurrent_weights(args[1], args[2])
    other = kind.make_args(5, 2, 7, 10, 2)  # another hidden size: another panel count
    cases = [
        (ops.pack_recurrent_weights(other[1], other[2]), RuntimeError, "packed_weights must be"),
        (packed.double(), RuntimeError, "packed_weights dtype"),
        (packed[:-1], RuntimeError, "packed_weights must be"),
        (packed.view(2, -1), RuntimeError, "packed_weights must be"),
        # Right size and dtype, but no packing (an artifact's buffer, a user's tensor): the
        # layout header says so, NaN included.
        (torch.zeros_like(packed), RuntimeError, "not a result of pack_recurrent_weights"),
        (torch.full_like(packed, float("nan")), RuntimeError, "not a result of pack_recurrent_weights"),
        # Panels of another build (another vector width: the AVX2 and AVX-512 panels can
        # have the same size) or of another layer whose panels have this size.
        (_with_header(packed, 1, 4 if int(packed[1]) != 4 else 8), RuntimeError, "vector width"),
        (_with_header(packed, 4, 99), RuntimeError, "packed for a layer of"),
    ]
    with torch.no_grad():
        for bad, exc, message in cases:
            with pytest.raises(exc, match=message):
                kind.op(*args, packed_weights=bad)
    # With a gradient to compute, the backward would read the weights: refused, not
    # silently mixed.
    args[0].requires_grad_(True)
    with pytest.raises(ValueError, match="packed_weights serve inference"):
        kind.op(*args, packed_weights=packed)
    # bfloat16 layers run on their own bfloat16 panels.
    with torch.no_grad(), pytest.raises(RuntimeError, match="float32/float64"):
        kind.op(*[a.bfloat16() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                  for a in args], packed_weights=packed)
    # The reference backend reads the weights itself.
    with torch.no_grad(), pytest.raises(ValueError, match="native CPU kernels"):
        getattr(functional, kind.op_name)(*args, backend="reference", packed_weights=packed)


def test_pack_has_a_meta_kernel_of_the_real_size():
    """torch.export and AOTInductor trace the packing (seqfuse.nn.serving_trace): its fake
    must have the real result's size, which only the compiled build knows."""
    for D, G, I, H in [(1, 48, 5, 12), (2, 36, 0, 12), (2, 7, 3, 7)]:
        w_ih, w_hh = torch.randn(D, G, I), torch.randn(D, G, H)
        meta = ops.pack_recurrent_weights(w_ih.to("meta"), w_hh.to("meta"))
        assert meta.device.type == "meta"
        assert meta.shape == ops.pack_recurrent_weights(w_ih, w_hh).shape
    with pytest.raises(RuntimeError, match="G = 4H"):
        ops.pack_recurrent_weights(torch.empty(1, 10, 3, device="meta"), torch.empty(1, 10, 3, device="meta"))


def test_pack_refuses_what_it_cannot_pack():
    w = torch.randn(2, 12, 3)
    for weight_ih, weight_hh, message in [
        (w, torch.randn(2, 12), "weight_hh must be"),
        (w, torch.randn(2, 10, 3), "G = 4H"),
        (w, torch.randn(3, 12, 3), "D 1 or 2"),
        (torch.randn(1, 12, 3), torch.randn(2, 12, 3), "weight_ih must be"),
        (w.half(), torch.randn(2, 12, 3).half(), "float32/float64"),
        (w.double(), torch.randn(2, 12, 3), "weight_ih dtype"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            ops.pack_recurrent_weights(weight_ih, weight_hh)


MODULES = {"lstm": seqfuse.nn.LSTM, "gru": seqfuse.nn.GRU, "rnn": seqfuse.nn.RNN}


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("name", list(MODULES))
def test_module_keeps_panels_and_repacks_after_a_change(name, bidirectional):
    torch.manual_seed(3)
    m = MODULES[name](11, 19, num_layers=2, bidirectional=bidirectional).eval()
    ref = getattr(torch.nn, type(m).__name__)(11, 19, num_layers=2, bidirectional=bidirectional).eval()
    x, lengths = torch.randn(8, 5, 11), torch.tensor([8, 1, 3, 8, 5])

    def eager():
        ref.load_state_dict(m.state_dict())
        packed_in = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        with torch.no_grad():
            out, _ = ref(packed_in)
        return torch.nn.utils.rnn.pad_packed_sequence(out, total_length=8)[0]

    with torch.inference_mode():
        first = m(x, lengths=lengths)[0]
    panels = m._weight_cache[0][3]
    assert panels is not None  # the cache holds the kernel's panels
    torch.testing.assert_close(first, eager(), atol=2e-6, rtol=2e-5)
    with torch.no_grad():  # an in-place change in eval mode: only the version tells
        m.weight_hh_l0.mul_(0.5)
    with torch.inference_mode():
        second = m(x, lengths=lengths)[0]
    assert m._weight_cache[0][3] is not panels  # repacked
    torch.testing.assert_close(second, eager(), atol=2e-6, rtol=2e-5)


def test_module_input_gradient_with_frozen_weights_skips_the_panels():
    # Saliency on the input of a frozen model: the cache holds panels, but this call needs
    # a backward, which reads the weights: the kernel packs as usual and the gradient is
    # eager's.
    torch.manual_seed(4)
    m = seqfuse.nn.LSTM(6, 10, bidirectional=True).eval().requires_grad_(False)
    ref = torch.nn.LSTM(6, 10, bidirectional=True).eval().requires_grad_(False)
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        m(torch.randn(4, 2, 6))  # fills the cache, panels included
    x = torch.randn(4, 2, 6, requires_grad=True)
    (g,) = torch.autograd.grad(m(x)[0].sum(), x)
    x_ref = x.detach().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(ref(x_ref)[0].sum(), x_ref)
    torch.testing.assert_close(g, g_ref, atol=2e-6, rtol=2e-5)
