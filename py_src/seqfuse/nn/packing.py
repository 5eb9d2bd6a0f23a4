"""A packing that stays symbolic, for exporting models that call pack_padded_sequence.

A PackedSequence holds its rows' tokens back to back ([sum(lengths), *]) with
batch_sizes [max(lengths)]: both sizes are data, so torch.export cannot trace it
(pytorch/pytorch#62240: "GuardOnDataDependentSymNode"). Inside `symbolic_packing()` the
two functions that every PackedSequence path goes through, `torch._VF._pack_padded_sequence`
and `torch._VF._pad_packed_sequence` (torch.nn.utils.rnn.pack_padded_sequence,
pad_packed_sequence and pack_sequence call them; so user code that imported those by name
is covered too), are replaced, for the calling thread only, by:

    pack: data        = the padded input, time-major [max(lengths), B, *], in the order
                        pack_padded_sequence gives it (sorted, for enforce_sorted=False)
          batch_sizes = [max(lengths)] int64, batch_sizes[t] = #rows longer than t (as
                        torch's); the lengths [B] are remembered for this tensor
    pad:  (the data in the requested layout, positions past each row's length set to
           padding_value, as wide as total_length or max(lengths), the lengths)

max(lengths) is one data-dependent size (an unbacked SymInt under torch.export, checked
to lie in [1, T]); everything else is shape-static. seqfuse.nn's LSTM/GRU/RNN, given such
a PackedSequence (`symbolic_lengths`), run the padded data with `lengths=` (ONNX:
`sequence_lens`) and return the same kind of PackedSequence, with h_n in the caller's
batch order as torch.nn returns it. sorted_indices and unsorted_indices are torch's own
(pack_padded_sequence computes them with torch.sort: traced as ops).

What stays as in torch: element-wise work on `packed.data` (a Linear, dropout, an
activation, `PackedSequence(f(out.data), out.batch_sizes, ...)`). What differs: code that
uses `packed.data` as the flat [sum(lengths), *] tensor (returns it, splits it by
batch_sizes, reads its first dimension); the exporter's parity checks against the eager
model catch that (shapes differ). A PackedSequence built by hand from tensors, not by
pack_padded_sequence, is an error inside the context.

Only the calling thread sees the replacements (other threads calling pack_padded_sequence
meanwhile get torch's functions), contexts in different threads are serialised by a lock,
and torch's functions are put back when the outermost context exits, on error too.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

_NAMES = ("_pack_padded_sequence", "_pad_packed_sequence")
_LOCK = threading.RLock()
_state = {"owner": None, "depth": 0, "saved": {}, "lengths": {}}


class SymbolicPackingError(RuntimeError):
    """A PackedSequence use that the symbolic packing cannot trace correctly."""


def _active() -> bool:
    return _state["owner"] == threading.get_ident()


def symbolic_lengths(packed: PackedSequence) -> Tensor | None:
    """The lengths [B] (in the packed, sorted order) of a PackedSequence made inside
    symbolic_packing by this thread, else None (a real PackedSequence)."""
    if not _active():
        return None
    entry = _state["lengths"].get(id(packed.batch_sizes))
    if entry is None:
        raise SymbolicPackingError(
            "input: a PackedSequence whose batch_sizes were not made by pack_padded_sequence during "
            "this export trace (built by hand?) cannot be exported: pack it with "
            "torch.nn.utils.rnn.pack_padded_sequence (or pack_sequence), or keep its batch_sizes")
    return entry[1]


def _pack(input: Tensor, lengths: Tensor, batch_first: bool):
    """torch._VF._pack_padded_sequence(input [T, B, *] or [B, T, *], lengths [B] int64 CPU,
    batch_first) -> (data [max(lengths), B, *], batch_sizes [max(lengths)])."""
    if not _active():
        return _state["saved"]["_pack_padded_sequence"](input, lengths, batch_first)
    x = input.transpose(0, 1) if batch_first else input
    if lengths.dim() != 1 or lengths.shape[0] != x.shape[1]:
        raise SymbolicPackingError(f"pack_padded_sequence: lengths must have shape [B={x.shape[1]}], got "
                                   f"{tuple(lengths.shape)}")
    longest = lengths.max().item()  # an unbacked size under torch.export
    torch._check(longest >= 1, lambda: "pack_padded_sequence: lengths must be >= 1")
    torch._check(longest <= x.shape[0], lambda: f"pack_padded_sequence: lengths must be <= T={x.shape[0]} "
                                                "(the input's time steps)")
    data = x.narrow(0, 0, longest)
    steps = torch.arange(longest, device=lengths.device)
    batch_sizes = (lengths.unsqueeze(0) > steps.unsqueeze(1)).sum(1)
    # Both kept until the context exits, so that the id stays this tensor's.
    _state["lengths"][id(batch_sizes)] = (batch_sizes, lengths)
    return data, batch_sizes


def _pad(data: Tensor, batch_sizes: Tensor, batch_first: bool, padding_value: float, total_length: int):
    """torch._VF._pad_packed_sequence(data, batch_sizes, batch_first, padding_value,
    total_length) -> (padded [total_length, B, *] or [B, total_length, *], lengths [B]).
    total_length is pad_packed_sequence's, or batch_sizes.shape[0] = max(lengths)."""
    if not _active():
        return _state["saved"]["_pad_packed_sequence"](data, batch_sizes, batch_first, padding_value, total_length)
    lengths = symbolic_lengths(PackedSequence(data, batch_sizes))
    extra = data.new_full((total_length - data.shape[0], *data.shape[1:]), padding_value)
    padded = torch.cat([data, extra])
    steps = torch.arange(total_length, device=data.device)
    valid = (steps.unsqueeze(1) < lengths.to(data.device).unsqueeze(0)).view(
        total_length, lengths.shape[0], *([1] * (data.dim() - 2)))
    padded = torch.where(valid, padded, padded.new_full((), padding_value))
    return (padded.transpose(0, 1) if batch_first else padded), lengths


@contextlib.contextmanager
def symbolic_packing():
    """Within it, in this thread, pack_padded_sequence / pad_packed_sequence make and read
    the symbolic packing above (for export tracing only: seqfuse.export.export_model opens
    it around torch.export and the ONNX export)."""
    with _LOCK:  # another thread's context waits; this thread's nests
        outer = _state["depth"] == 0
        if outer:
            vf = torch._VF
            _state["saved"] = {n: getattr(vf, n) for n in _NAMES}
            _state["shadowed"] = {n: n in vars(vf) for n in _NAMES}
            _state["owner"] = threading.get_ident()
            vf._pack_padded_sequence, vf._pad_packed_sequence = _pack, _pad
        _state["depth"] += 1
        try:
            yield
        finally:
            _state["depth"] -= 1
            if outer:
                vf = torch._VF
                for n in _NAMES:
                    if _state["shadowed"][n]:
                        setattr(vf, n, _state["saved"][n])
                    else:  # torch._VF resolves it through its module __getattr__
                        delattr(vf, n)
                _state["owner"] = None
                _state["lengths"].clear()
