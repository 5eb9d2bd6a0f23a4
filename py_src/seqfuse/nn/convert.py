"""seqfuse.nn.convert: swap torch.nn recurrent layers for seqfuse's, weights included."""
from __future__ import annotations

from torch import nn

from .rnn import GRU, LSTM


def _from_torch(m: nn.LSTM | nn.GRU, backend: str) -> LSTM | GRU:
    if getattr(m, "proj_size", 0):
        raise NotImplementedError("convert: torch.nn.LSTM with proj_size > 0 is not supported yet")
    cls = LSTM if isinstance(m, nn.LSTM) else GRU
    p = m.weight_ih_l0
    new = cls(m.input_size, m.hidden_size, m.num_layers, m.bias, m.batch_first, m.dropout,
              m.bidirectional, device=p.device, dtype=p.dtype, backend=backend)
    new.load_state_dict(m.state_dict(), strict=True)
    new.train(m.training)
    return new


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Return `model` with every torch.nn.LSTM / torch.nn.GRU replaced by seqfuse's
    module holding the same weights (in place for submodules; a bare layer is returned
    converted)."""
    if isinstance(model, (nn.LSTM, nn.GRU)):
        return _from_torch(model, backend)
    for name, child in list(model.named_children()):
        setattr(model, name, convert(child, backend))
    return model
