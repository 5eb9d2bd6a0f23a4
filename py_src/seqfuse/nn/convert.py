"""seqfuse.nn.convert: swap torch.nn recurrent layers for seqfuse's, weights included."""
from __future__ import annotations

from torch import nn

from .rnn import GRU, LSTM, RNN

_REPLACEMENTS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN}


def _from_torch(m: nn.LSTM | nn.GRU | nn.RNN, backend: str) -> LSTM | GRU | RNN:
    if getattr(m, "proj_size", 0):
        raise NotImplementedError("convert: torch.nn.LSTM with proj_size > 0 is not supported yet")
    p = m.weight_ih_l0
    kw = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first, dropout=m.dropout,
              bidirectional=m.bidirectional, device=p.device, dtype=p.dtype, backend=backend)
    if isinstance(m, nn.RNN):
        kw["nonlinearity"] = m.nonlinearity
    new = _REPLACEMENTS[type(m)](m.input_size, m.hidden_size, **kw)
    new.load_state_dict(m.state_dict(), strict=True)
    new.train(m.training)
    return new


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Return `model` with every torch.nn.LSTM / GRU / RNN replaced by seqfuse's module
    holding the same weights (in place for submodules; a bare layer is returned
    converted). Subclasses of those are left alone: their forward may differ."""
    if type(model) in _REPLACEMENTS:
        return _from_torch(model, backend)
    for name, child in list(model.named_children()):
        setattr(model, name, convert(child, backend))
    return model
