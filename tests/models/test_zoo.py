"""Every model of the zoo (seqfuse.zoo.models.MODELS) on small random-weight configs with odd
sizes: output shapes, agreement with the same model on eager torch.nn layers
(seqfuse.nn.to_torch) and back (seqfuse.nn.convert) in outputs and parameter gradients,
a few optimizer steps that fit a small batch, checkpoints, and argument checks."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, ZOO_CONFIGS, ZOO_T, ZOO_TGT_V, ZOO_V, requires_native

from seqfuse import nn as snn
from seqfuse.atomic import DestinationError
from seqfuse.zoo.data import Vocab
from seqfuse.zoo.models import MODELS
from seqfuse.zoo.models.common import lengths_from_padding
from seqfuse.zoo.models.seq2seq import BOS_ID, EOS_ID
from seqfuse.nn import convert, to_torch
from seqfuse.zoo.train import WEIGHTS, load_checkpoint, save_checkpoint

V, TGT_V, T = ZOO_V, ZOO_TGT_V, ZOO_T  # (source) vocabulary, seq2seq target vocabulary, steps
B, S = 5, 6  # batch, seq2seq source steps (T: steps, target steps for seq2seq)
LENGTHS = [7, 1, 4, 6, 3]      # mixed, with a length-1 row; one row uses all T steps
SRC_LENGTHS = [6, 1, 3, 5, 2]
TGT_LENGTHS = [T - 1, 1, 3, T - 1, 2]  # seq2seq targets without <eos>; tgt_in adds <bos>

CONFIGS = ZOO_CONFIGS
NAMES = list(MODELS)
TOKEN_MODELS = ["lstm-classifier", "bilstm-classifier", "bilstm-attention", "bigru-classifier",
                "transformer-classifier", "lstm-tagger"]
DENSE_MODELS = ["lstm-rows", "lstm-regressor"]
# torch.nn module types that to_torch must produce, per model
TORCH_LAYERS = {
    "lstm-classifier": {"lstm": torch.nn.LSTM},
    "bilstm-classifier": {"lstm": torch.nn.LSTM},
    "bilstm-attention": {"lstm": torch.nn.LSTM},
    "bigru-classifier": {"gru": torch.nn.GRU},
    "transformer-classifier": {"encoder": torch.nn.TransformerEncoder,
                               "encoder.layers.0": torch.nn.TransformerEncoderLayer,
                               "encoder.layers.1": torch.nn.TransformerEncoderLayer},
    "lstm-rows": {"lstm": torch.nn.LSTM},
    "lstm-regressor": {"lstm": torch.nn.LSTM},
    "lstm-tagger": {"lstm": torch.nn.LSTM},
    "seq2seq-attention": {"encoder": torch.nn.GRU, "decoder": torch.nn.GRU},
}
SEQFUSE_LAYERS = {
    torch.nn.LSTM: snn.LSTM, torch.nn.GRU: snn.GRU,
    torch.nn.TransformerEncoder: snn.TransformerEncoder,
    torch.nn.TransformerEncoderLayer: snn.TransformerEncoderLayer,
}
OUT_ATOL = TOL[torch.float32]["out_atol"]
GRAD_ATOL = 1e-4


def test_the_zoo_is_covered():
    assert set(CONFIGS) == set(MODELS) == set(TORCH_LAYERS)
    assert set(TOKEN_MODELS) | set(DENSE_MODELS) | {"seq2seq-attention"} == set(MODELS)


def build(name, backend="native", seed=0):
    torch.manual_seed(seed)
    return MODELS[name](**CONFIGS[name], backend=backend)


def token_batch(lengths, steps, vocab, gen, low=4):
    """[len(lengths), steps] ids in [low, vocab) right-padded with 0, and the lengths."""
    lengths = torch.tensor(lengths)
    ids = torch.randint(low, vocab, (len(lengths), steps), generator=gen)
    ids[torch.arange(steps) >= lengths.unsqueeze(1)] = 0
    return ids, lengths


def inputs(name, seed=1):
    """The positional arguments of model `name`'s forward."""
    gen = torch.Generator().manual_seed(seed)
    if name in TOKEN_MODELS:
        return token_batch(LENGTHS, T, V, gen)
    if name == "lstm-rows":
        return (torch.rand(B, T, 5, generator=gen),)
    if name == "lstm-regressor":
        return (torch.randn(B, T, 5, generator=gen),)
    src, src_lengths = token_batch(SRC_LENGTHS, S, V, gen)
    tgt, _ = token_batch(TGT_LENGTHS, T - 1, TGT_V, gen)
    tgt_in = torch.cat([torch.full((B, 1), BOS_ID), tgt], 1)    # [B, T]
    return src, src_lengths, tgt_in


def first(out):
    return out[0] if isinstance(out, tuple) else out


def valid_steps(name, args):
    """[B, T] bool of the per-step outputs that carry meaning (tagger, seq2seq), or None."""
    if name == "lstm-tagger":
        return torch.arange(T) < args[1].unsqueeze(1)
    if name == "seq2seq-attention":
        return torch.ones(B, T, dtype=torch.bool)
    return None


def probe(name, out, args):
    """A scalar of the output with a fixed random weight per element (so every output
    element gets a distinct gradient); per-step outputs only at valid steps."""
    y = first(out)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    mask = valid_steps(name, args)
    if mask is not None:
        w = w * mask.unsqueeze(-1)
    return (y * w).sum()


def assert_outputs_close(got, want, atol=OUT_ATOL):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


# ---------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------


@requires_native
@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes(name):
    model = build(name).eval()
    args = inputs(name)
    with torch.no_grad():
        out = model(*args)
    if name in ("lstm-classifier", "bilstm-classifier", "bigru-classifier", "transformer-classifier",
                "lstm-rows"):
        assert out.shape == (B, 3)
    elif name == "bilstm-attention":
        logits, weights = out
        assert logits.shape == (B, 3) and weights.shape == (B, T)
    elif name == "lstm-regressor":
        assert out.shape == (B,)
    elif name == "lstm-tagger":
        assert out.shape == (B, T, 5)
    else:
        logits, weights = out
        assert logits.shape == (B, T, TGT_V) and weights.shape == (B, T, S)
    for t in out if isinstance(out, tuple) else (out,):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()


@requires_native
def test_attention_pooling_weights_are_a_distribution_over_valid_steps():
    model = build("bilstm-attention").eval()
    ids, lengths = inputs("bilstm-attention")
    with torch.no_grad():
        _, weights = model(ids, lengths)
    valid = torch.arange(T) < lengths.unsqueeze(1)
    torch.testing.assert_close(weights.sum(1), torch.ones(B), atol=1e-6, rtol=0)
    assert (weights[~valid] == 0).all()
    assert (weights[valid] > 0).all()
    assert weights[1, 0] == 1  # a length-1 row puts all weight on its only token


@requires_native
def test_seq2seq_attention_weights_and_greedy_decode():
    model = build("seq2seq-attention").eval()
    src, src_lengths, tgt_in = inputs("seq2seq-attention")
    with torch.no_grad():
        _, weights = model(src, src_lengths, tgt_in)
    valid = (torch.arange(S) < src_lengths.view(B, 1, 1)).expand(B, T, S)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, T), atol=1e-6, rtol=0)
    assert (weights[~valid] == 0).all()

    hyps, dec_weights = model.greedy_decode(src, src_lengths)
    assert isinstance(hyps, list) and len(hyps) == B
    L = dec_weights.shape[1]
    assert 1 <= L <= CONFIGS["seq2seq-attention"]["max_decode_len"]
    assert dec_weights.shape == (B, L, S)
    for row in hyps:
        assert isinstance(row, list) and all(isinstance(t, int) for t in row)
        assert EOS_ID not in row and len(row) <= L
        assert all(0 <= t < TGT_V for t in row)
    hyps3, w3 = model.greedy_decode(src, src_lengths, max_len=3)
    assert w3.shape[1] <= 3 and all(len(r) <= 3 for r in hyps3)


@requires_native
def test_greedy_decode_agrees_with_teacher_forcing_on_its_own_output():
    """Feeding greedy's tokens back with teacher forcing reproduces greedy's argmaxes."""
    model = build("seq2seq-attention").eval()
    src, src_lengths, _ = inputs("seq2seq-attention")
    hyps, weights = model.greedy_decode(src, src_lengths, max_len=4)
    full = [h + [EOS_ID] * (4 - len(h)) for h in hyps]
    tgt_in = torch.tensor([[BOS_ID] + row[:3] for row in full])
    with torch.no_grad():
        logits, tf_weights = model(src, src_lengths, tgt_in)
    pred = logits.argmax(-1).tolist()
    for h, p in zip(hyps, pred):
        assert p[:len(h)] == h
    # steps 0..len(h) were fed <bos> and h (the last one predicting <eos>): the same inputs
    for r, h in enumerate(hyps):
        n = min(len(h) + 1, 4)
        torch.testing.assert_close(tf_weights[r, :n], weights[r, :n], atol=OUT_ATOL, rtol=0)


@requires_native
@pytest.mark.parametrize("name", TOKEN_MODELS + ["seq2seq-attention"])
def test_padding_rows_and_lengths_from_padding(name):
    """Without lengths a row's length is its count of non-pad tokens, an all-padding row
    counting as one token; tokens past a row's length do not change its outputs."""
    model = build(name).eval()
    gen = torch.Generator().manual_seed(3)
    ids, lengths = token_batch([5, 0, 1, 3], 5, V, gen)  # row 1 is all padding
    implied = lengths_from_padding(ids, 0)
    assert implied.tolist() == [5, 1, 1, 3]
    past = torch.arange(5) >= implied.unsqueeze(1)
    junk = ids.masked_scatter(past, torch.randint(4, V, (int(past.sum()),), generator=gen))
    with torch.no_grad():
        if name == "seq2seq-attention":
            tgt_in = torch.full((4, 3), BOS_ID)
            call = lambda x, lens: model(x, lens, tgt_in)  # noqa: E731
        else:
            call = model
        got = call(ids, None)
        want = call(ids, implied)
        past_length = call(junk, implied)
    assert_outputs_close(got, want, atol=0)
    for t in got if isinstance(got, tuple) else (got,):
        assert torch.isfinite(t).all()
    if name == "lstm-tagger":  # per-token: only the valid steps are comparable
        valid = torch.arange(5) < implied.unsqueeze(1)
        torch.testing.assert_close(past_length[valid], want[valid], atol=OUT_ATOL, rtol=0)
    else:
        assert_outputs_close(past_length, want)


@requires_native
@pytest.mark.parametrize("name", DENSE_MODELS)
def test_dense_models_take_one_step_windows(name):
    model = build(name).eval()
    x = torch.rand(3, 1, 5)
    with torch.no_grad():
        out = model(x)
        ref = to_torch(copy.deepcopy(model))(x)
    assert out.shape == ((3, 3) if name == "lstm-rows" else (3,))
    torch.testing.assert_close(out, ref, atol=OUT_ATOL, rtol=0)


def test_regressor_starts_at_the_last_value_baseline():
    model = build("lstm-regressor", backend="reference")
    assert (model(torch.randn(4, T, 5)) == 0).all()


# ---------------------------------------------------------------------------------
# seqfuse layers vs torch.nn layers (to_torch) vs back again (convert)
# ---------------------------------------------------------------------------------


def three_models(name):
    model = build(name)
    torch_model = to_torch(copy.deepcopy(model))
    back = convert(copy.deepcopy(torch_model), backend="native")
    return model, torch_model, back


@requires_native
@pytest.mark.parametrize("name", NAMES)
def test_to_torch_and_convert_swap_the_layer_types(name):
    model, torch_model, back = three_models(name)
    for path, torch_cls in TORCH_LAYERS[name].items():
        assert type(model.get_submodule(path)) is SEQFUSE_LAYERS[torch_cls]
        assert type(torch_model.get_submodule(path)) is torch_cls
        assert type(back.get_submodule(path)) is SEQFUSE_LAYERS[torch_cls]
    assert not any(type(m).__module__.startswith("seqfuse.nn") and not isinstance(
        m, (snn.AdditiveAttention, snn.DotProductAttention)) for m in torch_model.modules())
    for m in torch_model.modules():  # no torch.nn counterpart: the eager composition
        if isinstance(m, (snn.AdditiveAttention, snn.DotProductAttention)):
            assert m.backend == "reference"
    for m in back.modules():  # and convert puts them back on the fused op
        if isinstance(m, (snn.AdditiveAttention, snn.DotProductAttention)):
            assert m.backend == "native"
    sd, tsd, bsd = model.state_dict(), torch_model.state_dict(), back.state_dict()
    assert list(sd) == list(tsd) == list(bsd)
    for k in sd:
        assert torch.equal(sd[k], tsd[k]) and torch.equal(sd[k], bsd[k]), k


@requires_native
@pytest.mark.parametrize("name", NAMES)
def test_outputs_match_torch_layers_in_eval(name):
    model, torch_model, back = (m.eval() for m in three_models(name))
    args = inputs(name)
    with torch.no_grad():
        out, ref, out_back = model(*args), torch_model(*args), back(*args)
    # the tagger's steps past a length compare too: both give the head's output of zeros
    assert_outputs_close(out, ref)
    assert_outputs_close(out_back, ref)
    if name == "seq2seq-attention":
        src, src_lengths, _ = args
        h, w = model.greedy_decode(src, src_lengths)
        h_ref, w_ref = torch_model.greedy_decode(src, src_lengths)
        assert h == h_ref
        torch.testing.assert_close(w, w_ref, atol=OUT_ATOL, rtol=0)


@requires_native
@pytest.mark.parametrize("name", NAMES)
def test_parameter_gradients_match_torch_layers(name):
    models = three_models(name)  # train mode, dropout 0
    args = inputs(name)
    grads = []
    for m in models:
        m.train()
        m.zero_grad()
        probe(name, m(*args), args).backward()
        grads.append({k: p.grad for k, p in m.named_parameters()})
    got, ref, back = grads
    assert list(got) == list(ref) == list(back)
    rtol = TOL[torch.float32]["grad_rtol"]
    for k in ref:
        assert got[k] is not None and ref[k] is not None, k
        for g in (got[k], back[k]):
            torch.testing.assert_close(g, ref[k], atol=GRAD_ATOL, rtol=rtol,
                                       msg=lambda m, k=k: f"{name} {k}: {m}")
    # the gradients are not trivially zero: the comparison can fail
    assert sum(float(g.abs().sum()) for g in ref.values()) > 0


# ---------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------


def targets(name, args, gen):
    if name in ("lstm-classifier", "bilstm-classifier", "bilstm-attention", "bigru-classifier",
                "transformer-classifier", "lstm-rows"):
        return torch.randint(0, 3, (B,), generator=gen)
    if name == "lstm-regressor":
        return torch.randn(B, generator=gen)
    if name == "lstm-tagger":
        tags = torch.randint(1, 5, (B, T), generator=gen)
        return tags.masked_fill(torch.arange(T) >= args[1].unsqueeze(1), 0)
    y = torch.cat([args[2][:, 1:], torch.zeros(B, 1, dtype=torch.long)], 1)  # tgt_in without <bos>
    y[torch.arange(B), torch.tensor(TGT_LENGTHS)] = EOS_ID
    return y


def loss_fn(name, out, y):
    out = first(out)
    if name == "lstm-regressor":
        return F.mse_loss(out, y)
    if out.dim() == 3:  # per token, 0 = padding
        return F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=0)
    return F.cross_entropy(out, y)


@requires_native
@pytest.mark.parametrize("name", NAMES)
def test_adam_fits_a_small_batch(name):
    model = build(name).train()
    args = inputs(name)
    y = targets(name, args, torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(name, model(*args), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


def test_seq2seq_targets_end_with_eos():
    args = inputs("seq2seq-attention")
    y = targets("seq2seq-attention", args, None)
    tgt_in = args[2]
    for r, n in enumerate(TGT_LENGTHS):
        assert y[r, :n].tolist() == tgt_in[r, 1:n + 1].tolist()
        assert y[r, n] == EOS_ID and (y[r, n + 1:] == 0).all()


# ---------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------

VOCAB = Vocab(["<pad>", "<unk>"] + [f"t{i}" for i in range(V - 2)])


@requires_native
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip(name, tmp_path):
    model = build(name).eval()
    with torch.no_grad():  # weights differ from a fresh model's (regressor head starts at zero)
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out_dir = tmp_path / "ckpt"
    assert save_checkpoint(model, name, VOCAB, out_dir) == out_dir
    loaded, loaded_name, vocab_path = load_checkpoint(out_dir, backend="native")
    assert loaded_name == name and type(loaded) is type(model) and not loaded.training
    assert loaded.config == model.config
    assert Vocab.load(vocab_path).itos == VOCAB.itos
    sd, lsd = model.state_dict(), loaded.state_dict()
    assert list(sd) == list(lsd)
    for k in sd:
        assert torch.equal(sd[k], lsd[k]), k
    args = inputs(name)
    with torch.no_grad():
        assert_outputs_close(loaded(*args), model(*args), atol=0)
    meta = json.loads((out_dir / "config.json").read_text())
    assert meta["model"] == name and meta["vocabs"] == ["vocab.json"]


@pytest.fixture
def checkpoint(tmp_path):
    model = build("bilstm-attention", backend="reference")
    return save_checkpoint(model, "bilstm-attention", VOCAB, tmp_path / "ckpt")


def test_load_truncated_weights_raises_value_error(checkpoint):
    weights = checkpoint / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_checkpoint(checkpoint, backend="reference")


def test_load_unknown_model_name_raises_value_error(checkpoint):
    meta = json.loads((checkpoint / "config.json").read_text())
    meta["model"] = "no-such-model"
    (checkpoint / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="no-such-model"):
        load_checkpoint(checkpoint, backend="reference")


def test_load_bad_json_missing_files_and_folders(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (checkpoint / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        load_checkpoint(checkpoint, backend="reference")
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_checkpoint(checkpoint, backend="reference")


def test_load_weights_of_another_shape_raises(checkpoint):
    meta = json.loads((checkpoint / "config.json").read_text())
    meta["config"]["hidden_size"] += 1
    (checkpoint / "config.json").write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_checkpoint(checkpoint, backend="reference")


def test_save_unknown_model_name_raises(tmp_path):
    with pytest.raises(ValueError, match="unknown model name"):
        save_checkpoint(build("lstm-rows", backend="reference"), "lstm-row", {}, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_an_existing_folder_atomically(checkpoint):
    # A previous checkpoint plus a file train does not write is not a checkpoint any more:
    # refused (issue 21: --out never deletes a user's files), replaced with force.
    (checkpoint / "stale.txt").write_text("from the previous run")
    model = build("bilstm-attention", backend="reference", seed=1)
    vocabs = {"vocab.json": VOCAB, "tags.json": Vocab(["<pad>", "x"])}
    with pytest.raises(DestinationError, match="stale.txt"):
        save_checkpoint(model, "bilstm-attention", vocabs, checkpoint, metrics={"accuracy": 0.5})
    assert (checkpoint / "stale.txt").exists()
    save_checkpoint(model, "bilstm-attention", vocabs, checkpoint, metrics={"accuracy": 0.5}, force=True)
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "config.json", "metrics.json", WEIGHTS, "tags.json", "vocab.json"]
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name]  # no temp folders left
    loaded, _, _ = load_checkpoint(checkpoint, backend="reference")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_failed_save_keeps_the_previous_checkpoint(checkpoint):
    before = (checkpoint / WEIGHTS).read_bytes()

    def failing_plot(folder):
        raise RuntimeError("plotting failed")

    with pytest.raises(RuntimeError, match="plotting failed"):
        save_checkpoint(build("bilstm-attention", backend="reference", seed=2), "bilstm-attention",
                        VOCAB, checkpoint, plot=failing_plot)
    assert (checkpoint / WEIGHTS).read_bytes() == before
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name]


# ---------------------------------------------------------------------------------
# Bad inputs name the argument
# ---------------------------------------------------------------------------------

IDS = torch.tensor([[4, 5, 0], [6, 0, 0]])

BAD_INPUTS = [
    ("lstm-classifier", lambda: (IDS.float(),), TypeError, "input_ids must hold integer token ids"),
    ("bilstm-classifier", lambda: (IDS.bool(),), TypeError, "input_ids must hold integer token ids"),
    ("bilstm-attention", lambda: (IDS[0],), ValueError, "input_ids must be a [B, T] tensor"),
    ("bigru-classifier", lambda: (IDS.unsqueeze(-1),), ValueError, "input_ids must be a [B, T] tensor"),
    ("transformer-classifier", lambda: (IDS, torch.tensor([2, 1, 1])), ValueError,
     "lengths must have shape [B=2]"),
    ("transformer-classifier", lambda: (torch.ones(1, 17, dtype=torch.long),), ValueError,
     "more than max_len=16"),
    ("lstm-tagger", lambda: (IDS.double(),), TypeError, "input_ids must hold integer token ids"),
    ("lstm-tagger", lambda: (IDS, torch.tensor([[2, 1]])), ValueError, "lengths must have shape"),
    ("lstm-rows", lambda: (torch.rand(2, T, 4),), ValueError, "images must be [B, T, 5]"),
    ("lstm-rows", lambda: (torch.rand(T, 5),), ValueError, "images must be [B, T, 5]"),
    ("lstm-rows", lambda: (torch.ones(2, T, 5, dtype=torch.long),), TypeError,
     "images must be a floating-point tensor"),
    ("lstm-regressor", lambda: (torch.rand(2, T, 3),), ValueError, "x must be [B, T, 5]"),
    ("lstm-regressor", lambda: (torch.ones(2, T, 5, dtype=torch.int32),), TypeError,
     "x must be a floating-point tensor"),
    ("seq2seq-attention", lambda: (IDS.float(), None, IDS), TypeError, "src_ids must hold integer"),
    ("seq2seq-attention", lambda: (IDS, None, IDS.float()), TypeError, "tgt_in must hold integer"),
    ("seq2seq-attention", lambda: (IDS[0], None, IDS), ValueError, "src_ids must be a [B, T] tensor"),
    ("seq2seq-attention", lambda: (IDS, torch.tensor([1]), IDS), ValueError, "lengths must have shape"),
]


@pytest.mark.parametrize("name,args,error,message", BAD_INPUTS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_INPUTS)])
def test_bad_inputs_name_the_argument(name, args, error, message):
    model = build(name, backend="reference").eval()
    with pytest.raises(error) as exc:
        model(*args())
    assert message in str(exc.value)


BAD_LENGTHS = {
    "float": (torch.tensor([2.0, 1.0]), TypeError),
    "past-T": (torch.tensor([4, 1]), ValueError),
    "zero": (torch.tensor([2, 0]), ValueError),
    "negative": (torch.tensor([2, -1]), ValueError),
}


@pytest.mark.parametrize("case", list(BAD_LENGTHS))
@pytest.mark.parametrize("name", TOKEN_MODELS + ["seq2seq-attention"])
def test_bad_lengths_raise(name, case):
    lengths, error = BAD_LENGTHS[case]
    model = build(name, backend="reference").eval()
    args = (IDS, lengths, IDS) if name == "seq2seq-attention" else (IDS, lengths)
    with pytest.raises(error, match="lengths"):
        model(*args)
