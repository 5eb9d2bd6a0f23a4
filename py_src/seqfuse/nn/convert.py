"""seqfuse.nn.convert: swap torch.nn recurrent and attention layers for seqfuse's,
weights included; seqfuse.nn.to_torch: the other way, for eager PyTorch baselines."""
from __future__ import annotations

from torch import nn

from ..backend import check_backend
from .attention import AdditiveAttention, DotProductAttention, MultiheadAttention
from .rnn import GRU, LSTM, RNN
from .transformer import TransformerEncoder, TransformerEncoderLayer

_RECURRENT = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN}


def _recurrent_from_torch(m: nn.LSTM | nn.GRU | nn.RNN, backend: str) -> LSTM | GRU | RNN:
    if getattr(m, "proj_size", 0):
        raise NotImplementedError("convert: torch.nn.LSTM with proj_size > 0 is not supported yet")
    p = m.weight_ih_l0
    kw = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first, dropout=m.dropout,
              bidirectional=m.bidirectional, device=p.device, dtype=p.dtype, backend=backend)
    if isinstance(m, nn.RNN):
        kw["nonlinearity"] = m.nonlinearity
    new = _RECURRENT[type(m)](m.input_size, m.hidden_size, **kw)
    new.load_state_dict(m.state_dict(), strict=True)
    new.train(m.training)
    return new


def _copy_modes(new: nn.Module, old: nn.Module) -> nn.Module:
    """train/eval of every submodule as in `old` (they may differ between submodules)."""
    old_modules = dict(old.named_modules())
    for name, mod in new.named_modules():
        if name in old_modules:
            mod.training = old_modules[name].training
    return new


def _mha_from_torch(m: nn.MultiheadAttention, backend: str) -> MultiheadAttention:
    p = m.out_proj.weight
    new = MultiheadAttention(
        m.embed_dim, m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
        add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn, kdim=m.kdim, vdim=m.vdim,
        batch_first=m.batch_first, device=p.device, dtype=p.dtype, backend=backend)
    new.load_state_dict(m.state_dict(), strict=True)
    return _copy_modes(new, m)


# The submodules of torch's encoder layer whose exact types we rebuild; a layer whose
# submodules were swapped for something else is left alone (its children still convert).
_LAYER_PARTS = {"self_attn": nn.MultiheadAttention, "linear1": nn.Linear, "linear2": nn.Linear,
                "norm1": nn.LayerNorm, "norm2": nn.LayerNorm, "dropout": nn.Dropout,
                "dropout1": nn.Dropout, "dropout2": nn.Dropout}


def _layer_from_torch(m: nn.TransformerEncoderLayer, backend: str) -> TransformerEncoderLayer | None:
    if any(type(getattr(m, name, None)) is not cls for name, cls in _LAYER_PARTS.items()):
        return None
    if not m.self_attn._qkv_same_embed_dim or m.self_attn.bias_k is not None or m.self_attn.add_zero_attn:
        return None  # not something torch's constructor makes
    p = m.linear1.weight
    new = TransformerEncoderLayer(
        m.self_attn.embed_dim, m.self_attn.num_heads, dim_feedforward=m.linear1.out_features,
        dropout=m.dropout.p, activation=m.activation, layer_norm_eps=m.norm1.eps,
        batch_first=m.self_attn.batch_first, norm_first=m.norm_first,
        bias=m.linear1.bias is not None, device=p.device, dtype=p.dtype, backend=backend)
    # Settings a user may have changed after construction, each kept as it is.
    new.self_attn.dropout = m.self_attn.dropout
    new.dropout1.p, new.dropout2.p = m.dropout1.p, m.dropout2.p
    new.norm2.eps = m.norm2.eps
    new.load_state_dict(m.state_dict(), strict=True)
    return _copy_modes(new, m)


def _encoder_from_torch(m: nn.TransformerEncoder, backend: str) -> TransformerEncoder:
    # torch's encoder must go too: in eval with a key-padding mask it feeds its layers
    # nested tensors (decided from torch layer types at construction), which ours reject.
    layers = [convert(layer, backend) for layer in m.layers]
    new = TransformerEncoder(layers[0], 1, norm=None,
                             enable_nested_tensor=m.enable_nested_tensor,
                             mask_check=getattr(m, "mask_check", True))
    new.layers = nn.ModuleList(layers)
    new.num_layers = m.num_layers
    new.norm = None if m.norm is None else convert(m.norm, backend)
    new.training = m.training
    return new


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Return `model` with every torch.nn.LSTM / GRU / RNN / MultiheadAttention /
    TransformerEncoderLayer / TransformerEncoder replaced by seqfuse's module holding the
    same weights, settings and train/eval modes (in place for submodules; a bare layer is
    returned converted), and set seqfuse's own attention modules to `backend`. Subclasses of those are left alone (their forward may differ),
    and so is an encoder layer whose submodules are not torch's own types; their children
    are still converted."""
    kind = type(model)
    new = None
    if kind in _RECURRENT:
        new = _recurrent_from_torch(model, backend)
    elif kind is nn.MultiheadAttention:
        new = _mha_from_torch(model, backend)
    elif kind is nn.TransformerEncoderLayer:
        new = _layer_from_torch(model, backend)
    elif kind is nn.TransformerEncoder:
        new = _encoder_from_torch(model, backend)
    if new is not None:
        return new
    if isinstance(model, (AdditiveAttention, DotProductAttention)):
        model.backend = check_backend(backend)  # e.g. back from to_torch's 'reference'
        return model
    for name, child in list(model.named_children()):
        setattr(model, name, convert(child, backend))
    return model


# ---------------------------------------------------------------------------------
# The other way: seqfuse -> torch.nn (eager PyTorch baselines of the same model)
# ---------------------------------------------------------------------------------

_TORCH_RECURRENT = {LSTM: nn.LSTM, GRU: nn.GRU, RNN: nn.RNN}


def _recurrent_to_torch(m: LSTM | GRU | RNN) -> nn.Module:
    p = m.weight_ih_l0
    kw = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first, dropout=m.dropout,
              bidirectional=m.bidirectional, device=p.device, dtype=p.dtype)
    if isinstance(m, RNN):
        kw["nonlinearity"] = m.nonlinearity
    new = _TORCH_RECURRENT[type(m)](m.input_size, m.hidden_size, **kw)
    new.load_state_dict(m.state_dict(), strict=True)
    return new.train(m.training)


def _layer_to_torch(m: TransformerEncoderLayer) -> nn.TransformerEncoderLayer:
    a, p = m.self_attn, m.linear1.weight
    new = nn.TransformerEncoderLayer(
        a.embed_dim, a.num_heads, dim_feedforward=m.linear1.out_features, dropout=m.dropout.p,
        activation=m.activation, layer_norm_eps=m.norm1.eps, batch_first=a.batch_first,
        norm_first=m.norm_first, bias=m.linear1.bias is not None, device=p.device, dtype=p.dtype)
    new.self_attn.dropout = a.dropout
    new.dropout1.p, new.dropout2.p = m.dropout1.p, m.dropout2.p
    new.norm2.eps = m.norm2.eps
    new.load_state_dict(m.state_dict(), strict=True)
    return _copy_modes(new, m)


def to_torch(model: nn.Module) -> nn.Module:
    """The inverse of `convert`: every seqfuse LSTM / GRU / RNN / TransformerEncoderLayer /
    TransformerEncoder replaced by torch.nn's with the same weights and modes, and every
    seqfuse attention module (no torch.nn counterpart) switched to backend='reference',
    the eager PyTorch composition. The result runs on eager PyTorch only: the baseline in
    speed comparisons. In place for submodules; a bare layer is returned converted."""
    if type(model) in _TORCH_RECURRENT:
        return _recurrent_to_torch(model)
    if type(model) is TransformerEncoderLayer:
        return _layer_to_torch(model)
    if type(model) is TransformerEncoder:
        layers = [to_torch(layer) for layer in model.layers]
        new = nn.TransformerEncoder(layers[0], 1, norm=None, enable_nested_tensor=model.enable_nested_tensor,
                                    mask_check=model.mask_check)
        new.layers = nn.ModuleList(layers)
        new.num_layers = model.num_layers
        new.norm = None if model.norm is None else to_torch(model.norm)
        return new.train(model.training)
    if type(model) is MultiheadAttention:
        p = model.out_proj.weight
        new = nn.MultiheadAttention(
            model.embed_dim, model.num_heads, dropout=model.dropout, bias=model.in_proj_bias is not None,
            add_bias_kv=model.bias_k is not None, add_zero_attn=model.add_zero_attn, kdim=model.kdim,
            vdim=model.vdim, batch_first=model.batch_first, device=p.device, dtype=p.dtype)
        new.load_state_dict(model.state_dict(), strict=True)
        return _copy_modes(new, model)
    if isinstance(model, (AdditiveAttention, DotProductAttention)):
        model.backend = "reference"
        return model
    for name, child in list(model.named_children()):
        setattr(model, name, to_torch(child))
    return model
