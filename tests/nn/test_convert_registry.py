"""seqfuse.nn.convert's conversion registry (issue 23): models written with the textbook
attention classes (d2l 1.0.3's, copied as users copy them into tests/textbook_models.py) and the usual
BiLSTM+attention pooling convert, and match the original in outputs and gradients;
look-alikes whose forward differs are refused by the verification run, naming the module;
user registrations, their precedence and removal; a refused swap leaves the whole model
unchanged; and a converted model still exports."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import seqfuse.nn as snn
from seqfuse.nn import (AdditivePooling, ConversionError, ConversionWarning, convert,
                        register_conversion, unregister_conversion)
from textbook_models import (AdditiveAttention, AddNorm, AttentionPool, BiLSTMAttention,  # noqa: F401
                             DotProductAttention, EncoderDecoder, LengthsPool, MultiHeadAttention,
                             PositionWiseFFN, Seq2SeqAttentionDecoder, Seq2SeqEncoder,
                             TransformerEncoderBlock, init_seq2seq, masked_softmax)

# ---------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------

ATOL, RTOL = 2e-5, 1e-4  # float32: seqfuse's fused kernels against eager PyTorch


@pytest.fixture(autouse=True)
def no_conversion_warnings():
    """Every test converts without ConversionWarning unless it expects one."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        yield


def converted_pair(model, *example):
    """(the original, converted in place) after one forward (d2l's LazyLinear) on `example`."""
    with torch.no_grad():
        model(*example)
    ref = copy.deepcopy(model)
    assert convert(model) is model
    return ref, model


def assert_same_outputs_and_grads(ref, model, *inputs):
    """Outputs, input-free parameter gradients and state_dict keys agree (train mode, no
    dropout: the paths are deterministic)."""
    assert list(model.state_dict()) == list(ref.state_dict())
    out, out_r = model(*inputs), ref(*inputs)
    torch.testing.assert_close(out, out_r, atol=ATOL, rtol=RTOL)
    outs, outs_r = (out, out_r) if isinstance(out, tuple) else ((out,), (out_r,))
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(o.shape, generator=g) for o in outs_r]
    sum(((o * w).sum() for o, w in zip(outs, weights))).backward()
    sum(((o * w).sum() for o, w in zip(outs_r, weights))).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads_r = {n: p.grad for n, p in ref.named_parameters()}
    assert set(grads) == set(grads_r)
    for name in grads_r:
        torch.testing.assert_close(grads[name], grads_r[name], atol=ATOL, rtol=RTOL, msg=name)


# ---------------------------------------------------------------------------------
# The textbook models convert and match
# ---------------------------------------------------------------------------------

def seq2seq_model(layers=2):
    torch.manual_seed(0)
    encoder = Seq2SeqEncoder(13, 6, 8, layers)
    decoder = Seq2SeqAttentionDecoder(11, 5, 8, layers)
    return EncoderDecoder(encoder, decoder)


@pytest.mark.parametrize("valid", [(1, 7, 4), (7, 7, 7), (1, 1, 1)], ids=["mixed", "full", "one"])
def test_d2l_seq2seq_with_additive_attention_converts_and_matches(valid):
    enc_X, dec_X = torch.randint(0, 13, (3, 7)), torch.randint(0, 11, (3, 4))
    valid_lens = torch.tensor(valid)
    ref, model = converted_pair(seq2seq_model(), enc_X, dec_X, valid_lens)
    dec = model.decoder
    assert type(dec.attention) is snn.AdditiveAttention
    assert type(dec.rnn) is snn.GRU and type(model.encoder.rnn) is snn.GRU
    assert dec.attention.W_q.in_features == 8 and dec.attention.dropout.p == 0
    assert_same_outputs_and_grads(ref, model, enc_X, dec_X, valid_lens)
    # d2l reads the weights off the attention module (before dropout), per decoding step
    assert len(dec.attention_weights) == 4
    for w, w_r in zip(dec.attention_weights, ref.decoder.attention_weights):
        torch.testing.assert_close(w, w_r, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("lens_dim", [1, 2])
def test_d2l_transformer_block_converts_through_its_dot_product_attention(lens_dim):
    """d2l's MultiHeadAttention keeps its projections and head reshapes (GEMMs and views);
    its DotProductAttention, the softmax(q k^T / sqrt(d)) v with d2l's masked_softmax on
    [B * heads, Q, K] and valid_lens repeated per head, is swapped."""
    torch.manual_seed(0)
    X = torch.randn(3, 6, 12)
    valid_lens = torch.tensor([1, 6, 4]) if lens_dim == 1 else torch.tensor(
        [[1, 2, 3, 4, 5, 6], [6, 6, 6, 6, 6, 6], [1, 1, 4, 4, 2, 6]])
    ref, model = converted_pair(TransformerEncoderBlock(12, 10, 3, 0.0, use_bias=True), X, valid_lens)
    assert type(model.attention.attention) is snn.DotProductAttention
    assert type(model.attention) is MultiHeadAttention  # its own forward, as written
    assert_same_outputs_and_grads(ref, model, X, valid_lens)
    w, w_r = model.attention.attention.attention_weights, ref.attention.attention.attention_weights
    assert w.shape == (9, 6, 6)
    torch.testing.assert_close(w, w_r, atol=ATOL, rtol=RTOL)


def test_d2l_multi_head_attention_cross_attention_with_2d_valid_lens():
    torch.manual_seed(0)
    mha = MultiHeadAttention(10, 2, 0.0)
    q, kv = torch.randn(2, 3, 7), torch.randn(2, 5, 9)
    valid_lens = torch.tensor([[1, 5, 2], [5, 5, 3]])
    ref, mha = converted_pair(mha, q, kv, kv, valid_lens)
    assert type(mha.attention) is snn.DotProductAttention
    assert_same_outputs_and_grads(ref, mha, q, kv, kv, valid_lens)


@pytest.mark.parametrize("pool_cls", [AttentionPool, LengthsPool])
def test_bilstm_attention_classifier_pooling_converts_and_matches(pool_cls):
    torch.manual_seed(0)
    ids = torch.randint(1, 20, (4, 7))
    lengths = torch.tensor([7, 1, 4, 7])
    ids[torch.arange(7)[None, :] >= lengths[:, None]] = 0
    ref, model = converted_pair(BiLSTMAttention(pool_cls, pass_mask=pool_cls is AttentionPool), ids, lengths)
    assert type(model.lstm) is snn.LSTM and type(model.attention) is AdditivePooling
    if pool_cls is AttentionPool:
        assert model.attention.extra_form == "mask" and model.attention.returns_weights
        assert model.attention.W.weight.shape == (5, 18) and model.attention.W.bias is not None
    else:
        assert model.attention.extra_form == "lengths" and not model.attention.returns_weights
        assert isinstance(model.attention.context, nn.Parameter)
    assert_same_outputs_and_grads(ref, model, ids, lengths)


def test_swaps_keep_the_parameters_an_optimizer_already_holds():
    torch.manual_seed(0)
    model = BiLSTMAttention()
    ids, lengths = torch.randint(1, 20, (2, 5)), torch.tensor([5, 2])
    pool_params = list(model.attention.parameters())
    convert(model)
    assert list(model.attention.parameters()) == pool_params  # the same tensors, not copies
    assert all(a is b for a, b in zip(model.attention.parameters(), pool_params))
    model(ids, lengths)[0].sum().backward()
    assert all(p.grad is not None for p in pool_params)


def test_the_backend_reaches_the_swaps_and_to_torch_puts_them_on_eager_pytorch():
    torch.manual_seed(0)
    model = BiLSTMAttention()
    model.decoder_like = MultiHeadAttention(6, 2, 0.0)
    ids, lengths, x = torch.randint(1, 20, (2, 5)), torch.tensor([5, 2]), torch.randn(2, 3, 6)
    model(ids, lengths), model.decoder_like(x, x, x, None)
    convert(model, backend="reference")
    swapped = (model.attention, model.decoder_like.attention)
    assert [type(m) for m in swapped] == [AdditivePooling, snn.DotProductAttention]
    assert [m.backend for m in swapped] == ["reference", "reference"]
    convert(model)  # seqfuse's modules are set to the backend asked for
    assert [m.backend for m in swapped] == ["auto", "auto"]
    snn.to_torch(model)
    assert type(model.lstm) is nn.LSTM and [m.backend for m in swapped] == ["reference", "reference"]


def test_convert_draws_nothing_from_the_global_rng_and_keeps_modes():
    model = seq2seq_model()
    enc_X, dec_X, valid = torch.randint(0, 13, (2, 5)), torch.randint(0, 11, (2, 3)), torch.tensor([5, 2])
    model(enc_X, dec_X, valid)
    model.train()
    model.decoder.attention.dropout.eval()  # modes are kept per submodule
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    convert(model)
    assert torch.equal(torch.rand(4), want)
    assert model.training and model.decoder.attention.training
    assert not model.decoder.attention.dropout.training


# ---------------------------------------------------------------------------------
# Look-alikes: the structure fits, the forward differs -> left alone, with a warning
# ---------------------------------------------------------------------------------

class ScaledByD(DotProductAttention):
    """d2l's DotProductAttention scaled by d, not sqrt(d)."""
    def forward(self, queries, keys, values, valid_lens=None):
        scores = torch.bmm(queries, keys.transpose(1, 2)) / queries.shape[-1]
        self.attention_weights = masked_softmax(scores, valid_lens)
        return torch.bmm(self.dropout(self.attention_weights), values)


class Unmasked(AdditiveAttention):
    """d2l's AdditiveAttention that ignores valid_lens."""
    def forward(self, queries, keys, values, valid_lens):
        return super().forward(queries, keys, values, None)


class UnmaskedPool(AttentionPool):
    def forward(self, h, mask):
        alpha = F.softmax(self.v(torch.tanh(self.W(h))).squeeze(-1), dim=1)
        return torch.bmm(alpha.unsqueeze(1), h).squeeze(1), alpha


def _lookalike_model(kind):
    torch.manual_seed(0)
    if kind == "dot":
        mha = MultiHeadAttention(8, 2, 0.0)
        mha.attention = ScaledByD(0.0)
        model = nn.ModuleDict({"encoder": nn.ModuleDict({"mha": mha})})
        x = torch.randn(2, 4, 8)
        run = lambda m: m["encoder"]["mha"](x, x, x, torch.tensor([1, 3]))  # noqa: E731
        return model, run, "encoder.mha.attention", ("encoder", "mha", "attention")
    if kind == "additive":
        att = Unmasked(6, 0.0)
        model = nn.ModuleDict({"encoder": nn.ModuleDict({"attention": att})})
        q, k = torch.randn(2, 1, 5), torch.randn(2, 4, 3)
        run = lambda m: m["encoder"]["attention"](q, k, k, torch.tensor([1, 4]))  # noqa: E731
        return model, run, "encoder.attention", ("encoder", "attention")
    model = BiLSTMAttention(UnmaskedPool)
    ids, lengths = torch.randint(1, 20, (2, 5)), torch.tensor([5, 2])
    return model, lambda m: m(ids, lengths), "attention", ("attention",)


@pytest.mark.parametrize("kind", ["dot", "additive", "pool"])
def test_a_lookalike_with_another_forward_is_left_alone_with_a_warning(kind):
    model, run, path, keys = _lookalike_model(kind)
    with torch.no_grad():
        before = run(model)
    target = model
    for k in keys:
        target = target[k] if isinstance(target, nn.ModuleDict) else getattr(target, k)
    kind_before = type(target)
    state_before = dict(target.__dict__)
    with pytest.warns(ConversionWarning, match=rf"'{path}' \({kind_before.__qualname__}\).*"
                                               r"differ by max [0-9.e+-]+"):
        convert(model)
    again = model
    for k in keys:
        again = again[k] if isinstance(again, nn.ModuleDict) else getattr(again, k)
    assert again is target and type(again) is kind_before
    assert target.__dict__.keys() == state_before.keys()  # the run left no attribute behind
    assert all(target.__dict__[k] is v for k, v in state_before.items())
    with torch.no_grad():
        torch.testing.assert_close(run(model), before)
    # the warning says how to silence it, and that does
    with register_conversion(kind_before, None):
        convert(model)


def test_a_lazy_d2l_module_not_yet_run_is_left_alone_with_a_warning():
    model = nn.ModuleDict({"attention": AdditiveAttention(6, 0.0), "rnn": nn.GRU(3, 4)})
    with pytest.warns(ConversionWarning, match="'attention'.*lazy parameters.*run the model"):
        convert(model)
    assert type(model["attention"]) is AdditiveAttention and type(model["rnn"]) is snn.GRU


def test_structural_matchers_do_not_touch_torch_or_seqfuse_classes():
    model = nn.Sequential(nn.Dropout(0.1), snn.DotProductAttention(0.1), nn.Linear(3, 1, bias=False))
    convert(model)
    assert [type(m) for m in model] == [nn.Dropout, snn.DotProductAttention, nn.Linear]


# ---------------------------------------------------------------------------------
# User registrations
# ---------------------------------------------------------------------------------

class Doubler(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.lin = nn.Linear(n, n)

    def forward(self, x):
        return 2 * self.lin(x)


class FusedDoubler(nn.Module):
    def __init__(self, lin, factor=2.0):
        super().__init__()
        self.lin, self.factor = lin, factor

    def forward(self, x):
        return F.linear(x, self.factor * self.lin.weight, self.factor * self.lin.bias)


def doubler_inputs(module, gen):
    return [((torch.randn(3, module.lin.in_features, generator=gen),), {})]


def test_a_user_registration_converts_its_class_and_is_verified():
    model = nn.Sequential(Doubler(), nn.ReLU())
    x = torch.randn(2, 4)
    want = model(x)
    with register_conversion(Doubler, lambda m, backend: FusedDoubler(m.lin),
                             example_inputs=doubler_inputs):
        convert(model)
    assert type(model[0]) is FusedDoubler
    torch.testing.assert_close(model(x), want)
    assert type(convert(nn.Sequential(Doubler()))[0]) is Doubler  # removed again


def test_a_refused_swap_names_the_module_and_leaves_the_model_unchanged():
    model = nn.Module()
    model.encoder = nn.Module()
    model.encoder.rnn = nn.LSTM(4, 4)            # would be swapped...
    model.encoder.head = Doubler()               # ...but this swap is wrong
    model.attn = nn.MultiheadAttention(4, 2)
    before = {n: type(m) for n, m in model.named_modules()}
    params = {n: p for n, p in model.named_parameters()}
    with register_conversion(Doubler, lambda m, backend: FusedDoubler(m.lin, factor=3.0),
                             example_inputs=doubler_inputs):
        with pytest.raises(ConversionError, match=r"'encoder.head' \(Doubler -> .*FusedDoubler.*\)"
                                                  r".*differ by max [0-9.e+-]+.*left unchanged"):
            convert(model)
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing half-swapped
    assert all(p is params[n] for n, p in model.named_parameters())


def test_a_swap_that_raises_or_changes_shape_or_keys_is_refused():
    def inputs(module, gen):
        return [((torch.randn(3, 4, generator=gen),), {})]
    cases = [(lambda m, b: nn.Linear(4, 5), "the state_dict keys would change"),
             (lambda m, b: nn.Sequential(), "state_dict keys"),
             (lambda m, b: _Wrap(m.lin, out=lambda y: y[:, :2]), r"shape \(3, 2\), the original's \(3, 4\)"),
             (lambda m, b: _Wrap(m.lin, out=lambda y: y.sum(-1).item()), "the swap raised")]
    for fn, why in cases:
        with register_conversion(Doubler, fn, example_inputs=inputs):
            with pytest.raises(ConversionError, match=why):
                convert(nn.Sequential(Doubler()))


class _Wrap(nn.Module):
    def __init__(self, lin, out):
        super().__init__()
        self.lin, self.out = lin, out

    def forward(self, x):
        return self.out(2 * self.lin(x))


def test_user_entry_wins_over_builtin_and_removal_restores_it():
    lstm = nn.LSTM(3, 5)
    with register_conversion(nn.LSTM, None):  # opt out of the built-in swap
        assert convert(lstm) is lstm
    assert type(convert(nn.LSTM(3, 5))) is snn.LSTM

    def to_reference(m, backend):
        new = snn.LSTM(m.input_size, m.hidden_size, backend="reference")
        new.load_state_dict(m.state_dict())
        return new

    def inputs(m, gen):
        return [((torch.randn(2, 1, m.input_size, generator=gen),), {})]
    handle = register_conversion(nn.LSTM, to_reference, example_inputs=inputs)
    try:
        assert convert(nn.LSTM(3, 5)).backend == "reference"
        with pytest.raises(ValueError, match="already registered"):
            register_conversion(nn.LSTM, None)
        register_conversion(nn.LSTM, None, replace=True)
        assert type(convert(nn.LSTM(3, 5))) is nn.LSTM
    finally:
        unregister_conversion(nn.LSTM)
    handle.remove()  # a later registration was removed already: nothing to do, no error
    assert type(convert(nn.LSTM(3, 5))) is snn.LSTM
    with pytest.raises(KeyError, match="LSTM"):
        unregister_conversion(nn.LSTM)


class DoublerChild(Doubler):
    pass


def test_subclasses_follow_a_base_registration_and_an_exact_one_wins():
    with register_conversion(Doubler, lambda m, b: FusedDoubler(m.lin), example_inputs=doubler_inputs,
                             subclasses=True):
        assert type(convert(nn.Sequential(DoublerChild()))[0]) is FusedDoubler
        with register_conversion(DoublerChild, None):
            assert type(convert(nn.Sequential(DoublerChild()))[0]) is DoublerChild
    with register_conversion(Doubler, lambda m, b: FusedDoubler(m.lin), example_inputs=doubler_inputs):
        assert type(convert(nn.Sequential(DoublerChild()))[0]) is DoublerChild  # exact type only
    # torch.nn's built-ins are exact-type: a subclass of nn.MultiheadAttention stays
    class MyMHA(nn.MultiheadAttention):
        pass
    assert type(convert(nn.Sequential(MyMHA(4, 2)))[0]) is MyMHA


def test_registration_arguments_are_checked():
    with pytest.raises(TypeError, match="example_inputs is required"):
        register_conversion(Doubler, lambda m, b: m)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_conversion(int, None)
    with pytest.raises(TypeError, match="fn must be callable"):
        register_conversion(Doubler, "no")
    with register_conversion(Doubler, lambda m, b: FusedDoubler(m.lin, 5.0), verify=False):
        assert type(convert(nn.Sequential(Doubler()))[0]) is FusedDoubler  # unchecked, as asked
    with register_conversion(Doubler, lambda m, b: 3, example_inputs=doubler_inputs):
        with pytest.raises(TypeError, match="returned int"):
            convert(nn.Sequential(Doubler()))
    with register_conversion(Doubler, lambda m, b: FusedDoubler(m.lin), example_inputs=lambda m, g: []):
        with pytest.raises(TypeError, match="non-empty list"):
            convert(nn.Sequential(Doubler()))


def test_builtin_torch_swaps_are_verified_too():
    """A torch.nn layer whose seqfuse swap would disagree is refused: here a forward
    pre-hook on the original changes its input, and the swap would not carry the hook."""
    lstm = nn.LSTM(3, 4)
    lstm.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    model = nn.Sequential(lstm)
    with pytest.raises(ConversionError, match=r"'0' \(LSTM -> seqfuse.nn.rnn.LSTM.*differ by max"):
        convert(model)
    assert model[0] is lstm
    assert type(convert(nn.Sequential(nn.LSTM(3, 4)), verify=False)[0]) is snn.LSTM


# ---------------------------------------------------------------------------------
# A converted model still exports
# ---------------------------------------------------------------------------------

def test_converted_bilstm_attention_classifier_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    from seqfuse.export import export_model

    torch.manual_seed(0)
    model = BiLSTMAttention()
    ids, lengths = torch.randint(1, 20, (2, 7)), torch.tensor([7, 3])
    model(ids, lengths)
    convert(model).eval()
    assert type(model.attention) is AdditivePooling
    result = export_model(model, (ids, lengths), tmp_path / "art", formats=("onnx",),
                          input_names=["input_ids", "lengths"], output_names=["logits", "weights"],
                          dynamic_axes=[{0: "batch", 1: "time"}, {0: "batch"}], trace_length=6)
    assert result.parity.passed
    assert {"b=8 t=12", "b=1 t=1"} <= {r.case for r in result.parity.rows}
