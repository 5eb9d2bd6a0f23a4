"""Property tests (hypothesis) of the modules: seqfuse.nn.LSTM, GRU, RNN,
MultiheadAttention, TransformerEncoderLayer and TransformerEncoder against torch.nn's own
modules holding the same weights, and AdditiveAttention and DotProductAttention on the
native op against the same module on the reference backend. Cases, tolerances and the
hypothesis profiles: properties_common.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import seqfuse.nn as snn

from .properties_common import (
    DTYPES,
    FAST,
    FILTER_WARNINGS,
    MODULE,
    NATIVE_ADDITIVE,
    NATIVE_RNN,
    NATIVE_SDPA,
    R_IDS,
    R_KINDS,
    SEEDS,
    THREADS,
    TRITON,
    TRITON_ATTENTION_TOL,
    TRITON_DEVICE,
    TRITON_FRACTION,
    TRITON_MODULE_FRACTION,
    RKind,
    _lens_tensor,
    additive_cases,
    budget,
    check_against_truth,
    check_grads,
    check_outputs,
    grads_of,
    leaf,
    lengths_strategy,
    rand,
    randn,
    sdpa_cases,
    tol_for,
    torch_threads,
    weighted_loss,
)

pytestmark = FILTER_WARNINGS

# ===================================================================================
# Recurrent modules: seqfuse.nn.LSTM / GRU / RNN against torch.nn's
# ===================================================================================

FORMS = ("padded", "lengths", "packed", "packed-sorted", "unbatched")


@st.composite
def module_cases(draw, kind: RKind | None = None, max_T=9, max_B=5, max_size=11, max_layers=2,
                 dtypes=("float32", "float64")):
    kind = kind or draw(st.sampled_from(R_KINDS))
    form = draw(st.sampled_from(FORMS))
    T = draw(st.integers(1, max_T))
    B = 1 if form == "unbatched" else draw(st.integers(1, max_B))
    lengths = None
    if form in ("lengths", "packed", "packed-sorted"):
        lengths = lengths_strategy(draw, T, B)
        if form == "packed-sorted":
            lengths = sorted(lengths, reverse=True)
    return dict(
        kind=kind.name, form=form, T=T, B=B, I=draw(st.integers(1, max_size)),
        H=draw(st.integers(1, max_size)), num_layers=draw(st.integers(1, max_layers)),
        bidirectional=draw(st.booleans()), batch_first=draw(st.booleans()),
        bias=draw(st.booleans()), lengths=lengths, with_hx=draw(st.booleans()),
        weight_scale=draw(st.sampled_from([0.5, 1.0])), dtype=draw(st.sampled_from(dtypes)),
        threads=draw(THREADS), seed=draw(SEEDS),
    )


def _flat(state):
    return list(state) if isinstance(state, tuple) else [state]


def check_module(backend: str, case, device="cpu"):
    with torch_threads(case["threads"]):
        _check_module(backend, case, device)


def _check_module(backend: str, case, device="cpu"):
    kind = next(k for k in R_KINDS if k.name == case["kind"])
    dtype, tol = DTYPES[case["dtype"]], tol_for(DTYPES[case["dtype"]])
    g = torch.Generator().manual_seed(case["seed"])
    T, B, I, H, L = (case[k] for k in ("T", "B", "I", "H", "num_layers"))
    D = 2 if case["bidirectional"] else 1
    kw = dict(num_layers=L, bias=case["bias"], batch_first=case["batch_first"],
              bidirectional=case["bidirectional"], dtype=dtype, device=device)
    if kind.nonlinearity:
        kw["nonlinearity"] = kind.nonlinearity
    ref = getattr(nn, kind.module)(I, H, **kw)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(randn(g, p.shape, dtype, case["weight_scale"] * H ** -0.5, device))
    m = getattr(snn, kind.module)(I, H, **kw, backend=backend)
    m.load_state_dict(ref.state_dict(), strict=True)

    form, bf = case["form"], case["batch_first"]
    x = leaf(randn(g, (T, I) if form == "unbatched" else ((B, T, I) if bf else (T, B, I)),
                   dtype, device=device))
    hx = None
    if case["with_hx"]:
        shape = (L * D, H) if form == "unbatched" else (L * D, B, H)
        parts = [leaf(randn(g, shape, dtype, device=device)) for _ in range(kind.n_states)]
        hx = tuple(parts) if kind.n_states == 2 else parts[0]
    lengths = None if case["lengths"] is None else torch.tensor(case["lengths"])
    pnames = [n for n, _ in m.named_parameters()]
    assert pnames == [n for n, _ in ref.named_parameters()]
    names = ["input"] + [f"hx{i}" for i in range(len(_flat(hx)) if hx is not None else 0)] + pnames

    def run(mod, x, hx, is_seqfuse, packed_fields=None):
        """(outputs, gradients of input, hx and parameters); torch.nn gets lengths= as a
        packed input padded back."""
        if form == "lengths" and not is_seqfuse:
            y, h = mod(pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False), hx)
            out = (pad_packed_sequence(y, batch_first=bf, total_length=T)[0], h)
        elif form == "lengths":
            out = mod(x, hx, lengths=lengths)
        elif form.startswith("packed"):
            out = mod(pack_padded_sequence(x, lengths, batch_first=bf,
                                           enforce_sorted=form == "packed-sorted"), hx)
            assert isinstance(out[0], PackedSequence)
            if packed_fields is not None:
                packed_fields.append([getattr(out[0], f) for f in
                                      ("batch_sizes", "sorted_indices", "unsorted_indices")])
        else:
            out = mod(x, hx)
        y, h = out
        tensors = [y.data if isinstance(y, PackedSequence) else y, *_flat(h)]
        leaves = [x] + (_flat(hx) if hx is not None else []) + list(mod.parameters())
        return tensors, grads_of(weighted_loss(tensors, torch.Generator().manual_seed(1)), leaves)

    fields = []
    ours = run(m, x, hx, True, fields)
    want = run(ref, x, hx, False, fields)
    if fields:  # a PackedSequence out, ordered as torch's
        for a, b in zip(*fields, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)

    def truth():
        ref64 = copy.deepcopy(ref).double()
        x64 = x.detach().double().requires_grad_()
        hx64 = None if hx is None else (
            tuple(t.detach().double().requires_grad_() for t in hx) if isinstance(hx, tuple)
            else hx.detach().double().requires_grad_())
        return run(ref64, x64, hx64, False)

    check_against_truth(ours, want, tol, names, truth)


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=NATIVE_RNN)])
@pytest.mark.parametrize("kind", R_KINDS, ids=R_IDS)
@budget(MODULE)
@given(data=st.data())
def test_recurrent_module_matches_torch(backend, kind, data):
    """seqfuse.nn.LSTM/GRU/RNN(tanh, relu) holding torch.nn's weights: T 1..9, B 1..5,
    I, H 1..11, 1-2 layers, bidirectional, batch_first, bias, initial states or not, input
    padded, with lengths= (torch: packed and padded back), a PackedSequence (sorted or
    enforce_sorted=False) or unbatched; float32/float64. Outputs, final states and the
    gradients of the input, the initial states and every parameter. The reference backend
    is checked too: it is the oracle of the op tests."""
    check_module(backend, data.draw(module_cases(kind), label="case"))


@TRITON
@budget(TRITON_MODULE_FRACTION, minimum=2)
@given(case=module_cases(max_T=4, max_B=3, max_size=6, dtypes=("float32",)))
def test_recurrent_module_triton_matches_torch(case):
    """As test_recurrent_module_matches_torch on the Triton kernels (float32, tiny)."""
    check_module("triton", case, TRITON_DEVICE)


# ===================================================================================
# seqfuse.nn.AdditiveAttention
# ===================================================================================


@st.composite
def additive_module_cases(draw):
    base = draw(additive_cases(max_A=9))
    return dict(base, key_size=draw(st.integers(1, 9)), query_size=draw(st.integers(1, 9)),
                dropout=draw(st.sampled_from([0.0, 0.0, 0.4])), train=draw(st.booleans()),
                torch_seed=draw(SEEDS))


@NATIVE_ADDITIVE
@budget(FAST)
@given(case=additive_module_cases())
def test_additive_attention_module_native_matches_reference(case):
    """seqfuse.nn.AdditiveAttention(key_size, query_size, num_hiddens=A) on the native op
    against the same module on the reference backend (same weights): context,
    attention_weights and the gradients of queries, keys, values and W_q, W_k, w_v; valid_lens
    [B] / [B, Q] with zeros, int32/int64; dropout on the weights in training (the same torch
    seed on both sides draws the same mask)."""
    with torch_threads(case["threads"]):
        _run_additive_attention_module_native_matches_reference(case)


def _run_additive_attention_module_native_matches_reference(case):
    dtype, tol = DTYPES[case["dtype"]], tol_for(DTYPES[case["dtype"]])
    g = torch.Generator().manual_seed(case["seed"])
    B, Q, K, A, Dv = (case[k] for k in ("B", "Q", "K", "A", "Dv"))
    ref = snn.AdditiveAttention(case["key_size"], case["query_size"], A, case["dropout"],
                                backend="reference", dtype=dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(randn(g, p.shape, dtype, 0.5))
    m = snn.AdditiveAttention(case["key_size"], case["query_size"], A, case["dropout"],
                              backend="native", dtype=dtype)
    m.load_state_dict(ref.state_dict())
    m.train(case["train"]), ref.train(case["train"])
    qs, ks, vs = (leaf(randn(g, s, dtype), case["strided"]) for s in
                  ((B, Q, case["query_size"]), (B, K, case["key_size"]), (B, K, Dv)))
    lens = _lens_tensor(case, B, Q)
    torch.manual_seed(case["torch_seed"])
    y = m(qs, ks, vs, lens)
    torch.manual_seed(case["torch_seed"])
    y_r = ref(qs, ks, vs, lens)
    check_outputs([y, m.attention_weights], [y_r, ref.attention_weights], tol,
                  "context, attention_weights")
    names = ["queries", "keys", "values"] + [n for n, _ in m.named_parameters()]
    g_out = grads_of(weighted_loss([y], torch.Generator().manual_seed(1)),
                                [qs, ks, vs, *m.parameters()])
    g_ref = grads_of(weighted_loss([y_r], torch.Generator().manual_seed(1)),
                                [qs, ks, vs, *ref.parameters()])
    check_grads(g_out, g_ref, tol, names)


# ===================================================================================
# Scaled dot-product attention modules: DotProductAttention, MultiheadAttention
# ===================================================================================


@NATIVE_SDPA
@budget(FAST)
@given(case=sdpa_cases(max_H=1, dropout=False),
       dropout=st.sampled_from([0.0, 0.0, 0.3]), train=st.booleans(), torch_seed=SEEDS)
def test_dot_product_attention_module_native_matches_reference(case, dropout, train, torch_seed):
    """seqfuse.nn.DotProductAttention on the native op against the reference backend:
    output, attention_weights and the gradients of queries, keys and values; valid_lens
    [B] / [B, Q] with zeros; dropout in training (the same torch seed draws the same hash
    seed on both sides)."""
    with torch_threads(case["threads"]):
        _run_dot_product_attention_module_native_matches_reference(case, dropout, train, torch_seed)


def _run_dot_product_attention_module_native_matches_reference(case, dropout, train, torch_seed):
    dtype, tol = DTYPES[case["dtype"]], tol_for(DTYPES[case["dtype"]])
    g = torch.Generator().manual_seed(case["seed"])
    B, Q, K, D, Dv = (case[k] for k in ("B", "Q", "K", "D", "Dv"))
    qs, ks, vs = (leaf(randn(g, s, dtype), case["strided"])
                  for s in ((B, Q, D), (B, K, D), (B, K, Dv)))
    lens = _lens_tensor(case, B, Q)
    m = snn.DotProductAttention(dropout, backend="native").train(train)
    ref = snn.DotProductAttention(dropout, backend="reference").train(train)
    torch.manual_seed(torch_seed)
    y = m(qs, ks, vs, lens)
    torch.manual_seed(torch_seed)
    y_r = ref(qs, ks, vs, lens)
    check_outputs([y, m.attention_weights], [y_r, ref.attention_weights], tol,
                  "output, attention_weights")
    g_out = grads_of(weighted_loss([y], torch.Generator().manual_seed(1)), (qs, ks, vs))
    g_ref = grads_of(weighted_loss([y_r], torch.Generator().manual_seed(1)), (qs, ks, vs))
    check_grads(g_out, g_ref, tol, ["queries", "keys", "values"])


# -- MultiheadAttention --------------------------------------------------------------


@st.composite
def mha_cases(draw, max_N=3, max_L=5, max_S=6, max_heads=3, max_hd=4,
              dtypes=("float32", "float64")):
    heads, hd = draw(st.integers(1, max_heads)), draw(st.integers(1, max_hd))
    unbatched = draw(st.booleans())
    N = 1 if unbatched else draw(st.integers(1, max_N))
    L = draw(st.integers(1, max_L))
    self_attn = draw(st.booleans())
    S = L if self_attn else draw(st.integers(1, max_S))
    kdim = vdim = None
    if not self_attn:
        kdim = draw(st.none() | st.integers(1, 7))
        vdim = draw(st.none() | st.integers(1, 7))
    attn = draw(st.sampled_from([None, "bool2", "float2", "bool3", "float3"]))
    lens_form = draw(st.sampled_from([None, "N", "NL"]))
    lens = None
    if lens_form:
        n = N if lens_form == "N" else N * L
        lens = draw(st.lists(st.integers(0, S), min_size=n, max_size=n))
    return dict(
        heads=heads, head_dim=hd, N=N, L=L, S=S, unbatched=unbatched, self_attn=self_attn,
        kdim=kdim, vdim=vdim, bias=draw(st.booleans()), add_bias_kv=draw(st.booleans()),
        add_zero_attn=draw(st.booleans()), batch_first=draw(st.booleans()),
        kpm=draw(st.sampled_from([None, "bool", "float"])), attn=attn,
        # the hint: attn_mask is then the causal mask, in the drawn form
        is_causal=attn is not None and attn.endswith("2") and draw(st.booleans()),
        mask_p=draw(st.sampled_from([0.2, 0.5, 0.9])),
        keep_first_key=draw(st.booleans()),  # no fully masked row (torch gives NaN there)
        need_weights=draw(st.booleans()), average_attn_weights=draw(st.booleans()),
        lens_form=lens_form, lens=lens, lens_dtype="int64",
        dtype=draw(st.sampled_from(dtypes)), threads=draw(THREADS), seed=draw(SEEDS),
    )


def _torch_style_mask(g, kind, shape, p, keep_first, dtype):
    """torch's convention: bool True = masked out; float added (-inf masks out)."""
    banned = rand(g, shape) < p
    if keep_first:
        banned[..., 0] = False
    if kind == "bool":
        return banned
    return torch.zeros(shape, dtype=dtype).masked_fill(banned, float("-inf")) + \
        0.3 * randn(g, shape, dtype)


def check_mha(backend, case, tol=None, device="cpu"):
    with torch_threads(case["threads"]):
        _check_mha(backend, case, tol, device)


def _check_mha(backend, case, tol=None, device="cpu"):
    dtype = DTYPES[case["dtype"]]
    tol = tol or tol_for(dtype)
    g = torch.Generator().manual_seed(case["seed"])
    heads, N, L, S = case["heads"], case["N"], case["L"], case["S"]
    E = heads * case["head_dim"]
    kw = dict(bias=case["bias"], add_bias_kv=case["add_bias_kv"],
              add_zero_attn=case["add_zero_attn"], kdim=case["kdim"], vdim=case["vdim"],
              batch_first=case["batch_first"], dtype=dtype, device=device)
    ref = nn.MultiheadAttention(E, heads, **kw)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(randn(g, p.shape, dtype, 0.5, device))
    m = snn.MultiheadAttention(E, heads, **kw, backend=backend)
    m_ref = snn.MultiheadAttention(E, heads, **kw, backend="reference")
    for mod in (m, m_ref):
        mod.load_state_dict(ref.state_dict(), strict=True)
    for mod in (ref, m, m_ref):
        mod.eval()

    def seq(n_steps, width):
        if case["unbatched"]:
            return (n_steps, width)
        return (N, n_steps, width) if case["batch_first"] else (n_steps, N, width)

    query = leaf(randn(g, seq(L, E), dtype, device=device))
    if case["self_attn"]:
        key = value = query
        leaves, names = [query], ["query"]
    else:
        key = leaf(randn(g, seq(S, case["kdim"] or E), dtype, device=device))
        value = leaf(randn(g, seq(S, case["vdim"] or E), dtype, device=device))
        leaves, names = [query, key, value], ["query", "key", "value"]
    p, keep_first = case["mask_p"], case["keep_first_key"]
    kpm = attn_mask = None
    if case["kpm"]:
        kpm = _torch_style_mask(g, case["kpm"], (S,) if case["unbatched"] else (N, S), p,
                                keep_first, dtype).to(device)
    if case["attn"]:
        kind, dims = case["attn"][:-1], int(case["attn"][-1])
        shape = (L, S) if dims == 2 else (N * heads, L, S)
        if case["is_causal"]:
            banned = torch.ones(L, S, dtype=torch.bool).triu(1)
            attn_mask = banned if kind == "bool" else \
                torch.zeros(L, S, dtype=dtype).masked_fill(banned, float("-inf"))
        else:
            attn_mask = _torch_style_mask(g, kind, shape, p, keep_first, dtype)
        attn_mask = attn_mask.to(device)
    lens = _lens_tensor(case, N, L, device)
    if lens is not None and case["unbatched"]:
        lens = lens.reshape(-1) if case["lens_form"] == "NL" else lens.reshape(())
    call = dict(key_padding_mask=kpm, attn_mask=attn_mask, need_weights=case["need_weights"],
                average_attn_weights=case["average_attn_weights"], is_causal=case["is_causal"])
    extra = {} if lens is None else {"valid_lens": lens}

    def run(mod, inputs, call, extra):
        query, key, value = inputs
        out, w = mod(query, key, value, **call, **extra)
        outs = [out] + ([w] if w is not None else [])
        leaves = ([query] if key is query else [query, key, value]) + list(mod.parameters())
        return outs, grads_of(weighted_loss(outs, torch.Generator().manual_seed(1)), leaves)

    def truth():  # the reference backend in float64
        m64 = copy.deepcopy(m_ref).double()
        q64 = query.detach().double().requires_grad_()
        inputs = (q64, q64, q64) if case["self_attn"] else (
            q64, key.detach().double().requires_grad_(), value.detach().double().requires_grad_())
        call64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in call.items()}
        return run(m64, inputs, call64, extra)

    names = names + [n for n, _ in m.named_parameters()]
    ours = run(m, (query, key, value), call, extra)
    check_against_truth(ours, run(m_ref, (query, key, value), call, extra), tol, names, truth)
    # torch is no oracle without valid_lens (it has none), where it gives NaN (rows with no
    # key), or for is_causal with appended keys (add_bias_kv / add_zero_attn) when it drops
    # the mask (need_weights=False, no key_padding_mask): it then hides the appended key
    # from every query, unlike its own mask path; seqfuse documents the mask's semantics.
    torch_drops_mask = case["is_causal"] and kpm is None and not case["need_weights"] and (
        case["add_bias_kv"] or case["add_zero_attn"])
    if lens is None and not torch_drops_mask:
        outs_t, grads_t = run(ref, (query, key, value), call, {})
        if all(torch.isfinite(t).all() for t in outs_t + grads_t):
            check_against_truth(ours, (outs_t, grads_t), tol, names, truth)


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=NATIVE_SDPA)])
@budget(FAST)
@given(case=mha_cases())
def test_multihead_attention_matches_torch(backend, case):
    """seqfuse.nn.MultiheadAttention holding torch.nn.MultiheadAttention's weights: 1-3
    heads of dim 1..4, N 1..3 or unbatched, L 1..5, S 1..6, self-attention (the one-GEMM
    path) or cross-attention with kdim/vdim; bias, add_bias_kv, add_zero_attn, batch_first;
    key_padding_mask and attn_mask (2-D or 3-D) bool or float, is_causal with a causal
    attn_mask, valid_lens (0 included); need_weights, average_attn_weights; float32/float64.
    Output, weights and the gradients of the inputs and every parameter against the module
    on the reference backend, and against torch wherever torch's result is finite (torch
    gives NaN on rows with no key; has no valid_lens)."""
    check_mha(backend, case)


@TRITON
@budget(TRITON_FRACTION)
@given(case=mha_cases(max_N=2, max_L=4, max_S=5, max_heads=2, max_hd=3, dtypes=("float32",)))
def test_multihead_attention_triton_matches_torch(case):
    """As test_multihead_attention_matches_torch on the Triton SDPA kernel (float32)."""
    check_mha("triton", case, TRITON_ATTENTION_TOL, TRITON_DEVICE)


# ===================================================================================
# TransformerEncoderLayer / TransformerEncoder against torch.nn's, eval mode
# ===================================================================================


@st.composite
def encoder_cases(draw, dtypes=("float32", "float64")):
    S = draw(st.integers(1, 6))
    N = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 3))
    return dict(
        # d_model >= 4: a LayerNorm over 2-3 features is degenerate (near +-1 outputs whose
        # gradient blows up), and there even torch and seqfuse's reference backend, both
        # eager float32, differ by more than TOL and by more than 2x their errors
        heads=heads, head_dim=draw(st.integers(-(-4 // heads), 4)),
        dim_feedforward=draw(st.integers(1, 13)), N=N, S=S,
        norm_first=draw(st.booleans()), activation=draw(st.sampled_from(["relu", "gelu"])),
        batch_first=draw(st.booleans()), bias=draw(st.booleans()),
        layer_norm_eps=draw(st.sampled_from([1e-5, 1e-3])),
        # key padding: right padding to lengths in [1, S], plus random extra padding
        lengths=draw(st.none() | st.lists(st.integers(1, S), min_size=N, max_size=N)),
        kpm_kind=draw(st.sampled_from(["bool", "float"])),
        extra_padding=draw(st.booleans()),
        src_mask=draw(st.sampled_from([None, "bool", "float", "causal", "causal-hint"])),
        num_layers=draw(st.integers(1, 2)), final_norm=draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)), threads=draw(THREADS), seed=draw(SEEDS),
    )


def check_encoder(backend, case, whole_encoder: bool):
    with torch_threads(case["threads"]):
        _check_encoder(backend, case, whole_encoder)


def _check_encoder(backend, case, whole_encoder: bool):
    dtype, tol = DTYPES[case["dtype"]], tol_for(DTYPES[case["dtype"]])
    g = torch.Generator().manual_seed(case["seed"])
    heads, N, S = case["heads"], case["N"], case["S"]
    E = heads * case["head_dim"]
    layer_kw = dict(dim_feedforward=case["dim_feedforward"], dropout=0.0,
                    activation=case["activation"], layer_norm_eps=case["layer_norm_eps"],
                    batch_first=case["batch_first"], norm_first=case["norm_first"],
                    bias=case["bias"], dtype=dtype)
    torch_layer = nn.TransformerEncoderLayer(E, heads, **layer_kw)
    if whole_encoder:
        norm = nn.LayerNorm(E, dtype=dtype) if case["final_norm"] else None
        ref = nn.TransformerEncoder(torch_layer, case["num_layers"], norm=norm)
    else:
        ref = torch_layer
    with torch.no_grad():
        for name, p in ref.named_parameters():
            is_norm_weight = "norm" in name and "weight" in name  # around 1, as trained
            p.copy_(randn(g, p.shape, dtype, 0.5) + (1.0 if is_norm_weight else 0.0))
    if whole_encoder:
        m = snn.convert(ref, backend)
        assert type(m) is snn.TransformerEncoder
    else:
        m = snn.TransformerEncoderLayer(E, heads, **layer_kw, backend=backend)
        m.load_state_dict(ref.state_dict(), strict=True)
    ref.eval(), m.eval()

    x = leaf(randn(g, (N, S, E) if case["batch_first"] else (S, N, E), dtype))
    kpm = None
    if case["lengths"] is not None:
        pad = torch.arange(S) >= torch.tensor(case["lengths"])[:, None]  # key 0 always kept
        if case["extra_padding"]:
            extra = rand(g, (N, S)) < 0.3
            extra[:, 0] = False
            pad = pad | extra
        kpm = pad if case["kpm_kind"] == "bool" else \
            torch.zeros(N, S, dtype=dtype).masked_fill(pad, float("-inf"))
    mask, is_causal = None, False
    if case["src_mask"] in ("bool", "float"):
        mask = _torch_style_mask(g, case["src_mask"], (S, S), 0.4, True, dtype)
    elif case["src_mask"] is not None:
        mask = nn.Transformer.generate_square_subsequent_mask(S, dtype=dtype)
        is_causal = case["src_mask"] == "causal-hint"
    if whole_encoder:
        call = dict(mask=mask, src_key_padding_mask=kpm, is_causal=is_causal or None)
    else:
        call = dict(src_mask=mask, src_key_padding_mask=kpm, is_causal=is_causal)

    pnames = [n for n, _ in m.named_parameters()]
    assert pnames == [n for n, _ in ref.named_parameters()]

    def run(mod, x, call):
        y = mod(x, **call)
        return [y], grads_of(weighted_loss([y], torch.Generator().manual_seed(1)),
                             [x, *mod.parameters()])

    def truth():  # torch's module in float64
        call64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in call.items()}
        return run(copy.deepcopy(ref).double(), x.detach().double().requires_grad_(), call64)

    want = run(ref, x, call)
    check_against_truth(run(m, x, call), want, tol, ["src"] + pnames, truth)
    # Inference (no grad) computes the same, against torch's result above (torch's own
    # no-grad fast paths are not the oracle: its nested-tensor path zeroes padded
    # positions, and its fused layer gives NaN for some tiny shapes, e.g. d_model=2 with 2
    # heads and a float src_mask).
    with torch.no_grad():
        y = m(x, **call)
    check_against_truth(([y], []), ([want[0][0].detach()], []), tol, [],
                        lambda: ([truth()[0][0].detach()], []))


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=NATIVE_SDPA)])
@budget(MODULE)
@given(case=encoder_cases())
def test_transformer_encoder_layer_matches_torch(backend, case):
    """seqfuse.nn.TransformerEncoderLayer holding torch's weights, eval mode (dropout 0):
    d_model = heads (1..3) x head_dim (1..4) >= 4, dim_feedforward 1..13, N 1..3, S 1..6,
    norm_first, relu/gelu, batch_first, bias, layer_norm_eps; src_key_padding_mask bool or
    float (right padding plus random padding, key 0 kept), src_mask bool/float/causal (with
    or without the is_causal hint); float32/float64. Output and the gradients of src and
    every parameter; under no_grad (torch's fast path) the non-padded positions."""
    check_encoder(backend, case, whole_encoder=False)


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=NATIVE_SDPA)])
@budget(MODULE)
@given(case=encoder_cases())
def test_transformer_encoder_matches_torch(backend, case):
    """seqfuse.nn.convert(torch.nn.TransformerEncoder) (1-2 layers, optional final norm),
    as the layer property; under no_grad torch's nested-tensor path zeroes padded positions,
    so only the others are compared there. is_causal None lets the encoder detect the causal
    mask, as torch does."""
    check_encoder(backend, case, whole_encoder=True)
