"""seqfuse.nn.convert: swap layers in a user's model for seqfuse's, weights included, through
a conversion registry (seqfuse.nn.register_conversion); seqfuse.nn.to_torch: the other way,
for eager PyTorch baselines.

Which entry converts a module, first match wins:
  1. an entry registered by the user for exactly its type;
  2. a built-in entry for exactly its type (torch.nn.LSTM / GRU / RNN / MultiheadAttention /
     TransformerEncoderLayer / TransformerEncoder);
  3. a user entry registered with subclasses=True for a base class (the nearest in the MRO);
  4. for a class that is neither torch's nor seqfuse's, nor a subclass of a built-in entry's
     class: the built-in structural matchers (seqfuse.nn.textbook: d2l's AdditiveAttention and
     DotProductAttention, the additive pooling of BiLSTM+attention classifiers).
An entry found in 1-3 decides alone: fn returning None (or fn=None) leaves the module as it
is, and convert goes on into its children. A subclass of a built-in entry's class is left
alone unless registered (its forward may differ). A swapped module's children are not
visited: fn returns the finished module (it may call convert on its parts).

Every swap is verified before anything changes: the original and the new module run on
example inputs (eval mode, no grad, torch's global RNG states saved and restored, and any
attribute forward sets, such as d2l's attention_weights, put back), and their outputs must
agree within a per-dtype tolerance. A swap that disagrees, raises, or changes the state_dict
keys is refused: for registered entries (the user's and torch.nn's) with a ConversionError
naming the module path and the largest difference, and the model is left unchanged, since
swaps are applied only once all were verified; for the structural matchers, which only guess
from structure, with a ConversionWarning and that module left on its own code (a model that
merely resembles a textbook class keeps converting everything else). Modules on the meta
device are swapped unverified (they cannot run).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..backend import check_backend
from . import textbook
from .attention import AdditiveAttention, DotProductAttention, MultiheadAttention
from .rnn import GRU, LSTM, RNN
from .transformer import TransformerEncoder, TransformerEncoderLayer

_RECURRENT = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN}
# seqfuse's modules with no torch.nn counterpart: convert and to_torch set their backend.
_ATTENTION = (AdditiveAttention, DotProductAttention, textbook.AdditivePooling)


class ConversionError(RuntimeError):
    """convert refused a registered swap (the message names the module path and why)."""


class ConversionWarning(UserWarning):
    """convert left a module that looked like a textbook class on its own code."""


# example_inputs(module, generator) -> [(args, kwargs)]: the calls to verify a swap on.
ExampleInputs = Callable[[nn.Module, torch.Generator], list]


@dataclasses.dataclass(frozen=True, eq=False)
class _Entry:
    cls: type | None
    fn: Callable | None                 # (module, backend) -> nn.Module | None
    example_inputs: ExampleInputs | None
    subclasses: bool
    verify: bool
    builtin: bool
    name: str

    def candidates(self, module: nn.Module, backend: str, verify: bool) -> list:
        """[(new module, example calls or None)] for this module, in the order to try."""
        if self.fn is None:
            return []
        new = self.fn(module, backend)
        if new is None:
            return []
        if not isinstance(new, nn.Module):
            raise TypeError(f"convert: the conversion for {self.name} returned "
                            f"{type(new).__name__}, expected an nn.Module or None")
        calls = None
        if verify and self.verify:
            calls = self.example_inputs(module, torch.Generator().manual_seed(0))
        return [(new, calls)]


@dataclasses.dataclass(frozen=True, eq=False)
class _StructuralEntry:
    name: str
    match: Callable                     # (module, backend) -> [(new, calls)]
    verify: bool = True
    builtin: bool = True

    def candidates(self, module: nn.Module, backend: str, verify: bool) -> list:
        return self.match(module, backend)


_USER: dict[type, _Entry] = {}
_BUILTIN: dict[type, _Entry] = {}
_STRUCTURAL = tuple(_StructuralEntry(name, match) for name, match in textbook.STRUCTURAL)


class ConversionHandle:
    """What register_conversion returns: remove() takes the entry out again (a later
    registration for the same class is not touched)."""

    def __init__(self, entry: _Entry):
        self._entry = entry

    def remove(self) -> None:
        if _USER.get(self._entry.cls) is self._entry:
            del _USER[self._entry.cls]

    def __enter__(self) -> ConversionHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def register_conversion(cls: type, fn: Callable | None, *, example_inputs: ExampleInputs | None = None,
                        verify: bool = True, subclasses: bool = False,
                        replace: bool = False) -> ConversionHandle:
    """Make convert() swap instances of `cls` through `fn(module, backend) -> nn.Module | None`
    (None: leave this instance as it is; fn=None: leave every instance alone, which also
    keeps the built-in structural matchers off the class).

    example_inputs(module, generator) -> [(args, kwargs), ...]: the calls convert runs the
      original and the swap on before swapping (draw tensors with `generator`, on the CPU;
      convert moves them to the module's device). Required unless verify=False.
    subclasses: also convert subclasses of `cls` that have no entry of their own.
    replace: replace an earlier registration for `cls` (else that is a ValueError).

    Precedence (see seqfuse.nn.convert's module docstring): this entry wins over the
    built-in one for the same class, for example torch.nn.LSTM; remove it (the returned
    handle's remove(), also a context manager, or unregister_conversion) and the built-in
    one applies again. Returns the handle."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_conversion: cls must be an nn.Module subclass, got {cls!r}")
    if fn is not None and not callable(fn):
        raise TypeError(f"register_conversion({cls.__name__}): fn must be callable or None, got {fn!r}")
    if fn is not None and verify and example_inputs is None:
        raise TypeError(f"register_conversion({cls.__name__}): example_inputs is required, the "
                        f"calls convert checks the swap on (or pass verify=False to swap unchecked)")
    if example_inputs is not None and not callable(example_inputs):
        raise TypeError(f"register_conversion({cls.__name__}): example_inputs must be callable "
                        f"(module, generator) -> [(args, kwargs)], got {example_inputs!r}")
    if cls in _USER and not replace:
        raise ValueError(f"register_conversion: {cls.__qualname__} is already registered (to "
                         f"{_USER[cls].fn!r}); pass replace=True, or remove that entry first")
    entry = _Entry(cls, fn, example_inputs, subclasses, verify and fn is not None, False,
                   cls.__qualname__)
    _USER[cls] = entry
    return ConversionHandle(entry)


def unregister_conversion(cls: type) -> None:
    """Remove the user's entry for `cls` (a KeyError if there is none). Built-in entries
    cannot be removed; register cls with fn=None to turn one off."""
    if cls not in _USER:
        raise KeyError(f"unregister_conversion: {getattr(cls, '__qualname__', cls)!r} has no "
                       f"user registration")
    del _USER[cls]


def _builtin(cls: type, fn: Callable, example_inputs: ExampleInputs) -> None:
    _BUILTIN[cls] = _Entry(cls, fn, example_inputs, False, True, True, f"torch.nn.{cls.__name__}")


def _entry_for(module: nn.Module):
    kind = type(module)
    if kind in _USER:
        return _USER[kind]
    if kind in _BUILTIN:
        return _BUILTIN[kind]
    for base in kind.__mro__[1:]:
        entry = _USER.get(base)
        if entry is not None and entry.subclasses:
            return entry
    return None


def _structural_allowed(module: nn.Module) -> bool:
    name = type(module).__module__
    if name == "torch" or name.startswith(("torch.", "seqfuse.")):
        return False
    return not isinstance(module, tuple(_BUILTIN))


# ---------------------------------------------------------------------------------
# Verification: run the original and the swap on the same calls
# ---------------------------------------------------------------------------------

# (rtol, atol) per dtype: the kernels' own error against eager PyTorch with room to spare;
# what a different forward gives (a missing mask, another scale) is orders above.
_TOL = {torch.float64: (1e-7, 1e-7), torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-3),
        torch.bfloat16: (5e-2, 1e-2)}
# TF32 matmuls (torch's and Triton's default on CUDA) carry 10 mantissa bits.
_TOL_TF32 = (5e-3, 1e-3)


def _tolerance(t: Tensor) -> tuple[float, float]:
    if t.dtype == torch.float32 and t.device.type == "cuda":
        return _TOL_TF32
    return _TOL.get(t.dtype, (0.0, 0.0))


def _device_of(module: nn.Module) -> torch.device | None:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return None


def _to_device(value, device):
    if device is None:
        return value
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _cuda_indices(module: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in (*module.parameters(), *module.buffers())
                   if t.device.type == "cuda"})


@contextlib.contextmanager
def _isolated(*modules: nn.Module):
    """eval, no grad, torch's RNG states as they were, and each submodule's attributes
    (training flags, what forward stored: d2l's attention_weights) put back after."""
    subs = {id(m): m for mod in modules for m in mod.modules()}.values()
    saved = [(m, dict(m.__dict__)) for m in subs]
    # Containers are put back in place, contents as they were: a cache that forward fills
    # (seqfuse's weight cache) is the same object, emptied again.
    contents = [(v, copy.copy(v)) for _, state in saved for v in state.values()
                if type(v) in (dict, list, set, collections.OrderedDict)]
    cuda = sorted({i for mod in modules for i in _cuda_indices(mod)})
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            for mod in modules:
                mod.eval()
            yield
    finally:
        for container, before in contents:
            container.clear()
            if isinstance(container, list):
                container.extend(before)
            else:
                container.update(before)
        for m, state in saved:
            for key in [k for k in m.__dict__ if k not in state]:
                del m.__dict__[key]
            m.__dict__.update(state)


def _compare(got, want, where: str = "output") -> tuple[str | None, float, float]:
    """(why `got` differs from `want` in structure or None, the largest difference in units
    of the dtype's tolerance (> 1: a mismatch), the largest absolute difference)."""
    if isinstance(want, Tensor):
        if not isinstance(got, Tensor):
            return f"{where} is a {type(got).__name__}, the original's a Tensor", math.inf, math.inf
        if got.shape != want.shape:
            return f"{where} has shape {tuple(got.shape)}, the original's {tuple(want.shape)}", math.inf, math.inf
        if got.dtype != want.dtype:
            return f"{where} has dtype {got.dtype}, the original's {want.dtype}", math.inf, math.inf
        if not want.numel():
            return None, 0.0, 0.0
        if not (want.is_floating_point() or want.is_complex()):  # integers, bool: exactly
            if bool((got == want).all()):
                return None, 0.0, 0.0
            return None, math.inf, float((got.to(torch.float64) - want.to(torch.float64)).abs().max())
        g, w = got.to(torch.float64), want.to(torch.float64)
        same_nan = torch.isnan(g) == torch.isnan(w)
        g, w = torch.nan_to_num(g, nan=0.0), torch.nan_to_num(w, nan=0.0)
        rtol, atol = _tolerance(want)
        diff = (g - w).abs()
        ratio = diff / (atol + rtol * w.abs()) if rtol or atol else diff * math.inf
        worst = float(ratio.max()) if diff.any() else 0.0
        if not bool(same_nan.all()):
            worst = math.inf
        return None, worst, float(diff.max())
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            n = len(got) if isinstance(got, (tuple, list)) else "not a sequence"
            return f"{where} has {n} items, the original's {len(want)}", math.inf, math.inf
        worst = (None, 0.0, 0.0)
        for i, (g, w) in enumerate(zip(got, want)):
            r = _compare(g, w, f"{where}[{i}]")
            if r[0] is not None:
                return r
            worst = max(worst, r, key=lambda x: x[1])
        return worst
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return f"{where} has other keys than the original's", math.inf, math.inf
        worst = (None, 0.0, 0.0)
        for k in want:
            r = _compare(got[k], want[k], f"{where}[{k!r}]")
            if r[0] is not None:
                return r
            worst = max(worst, r, key=lambda x: x[1])
        return worst
    if got != want:
        return f"{where} is {got!r}, the original's {want!r}", math.inf, math.inf
    return None, 0.0, 0.0


@dataclasses.dataclass
class _Verdict:
    ok: bool
    same_structure: bool = True  # False: it raised, or returned another structure
    why: str = ""
    max_diff: float = 0.0


def _describe(args, kwargs) -> str:
    def one(v):
        if isinstance(v, Tensor):
            return f"{'x'.join(map(str, v.shape)) or 'scalar'} {str(v.dtype).replace('torch.', '')}"
        return repr(v) if v is None or isinstance(v, (bool, int, float, str)) else type(v).__name__
    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return f"({', '.join(parts)})"


def _verify(old: nn.Module, new: nn.Module, calls) -> _Verdict:
    if set(old.state_dict()) != set(new.state_dict()):
        lost = sorted(set(old.state_dict()) ^ set(new.state_dict()))
        return _Verdict(False, why=f"the state_dict keys would change ({', '.join(lost[:4])})",
                        same_structure=False)
    device = _device_of(old)
    if device is not None and device.type == "meta":
        return _Verdict(True)
    if not isinstance(calls, (list, tuple)) or not calls:
        raise TypeError(f"example_inputs must return a non-empty list of (args, kwargs), got {calls!r}")
    ran, first_error, worst = False, None, _Verdict(True)
    for i, call in enumerate(calls):
        if not (isinstance(call, (tuple, list)) and len(call) == 2 and isinstance(call[0], (tuple, list))
                and isinstance(call[1], dict)):
            raise TypeError(f"example_inputs must return a list of (args tuple, kwargs dict), got "
                            f"{call!r} at position {i}")
        args, kwargs = _to_device(tuple(call[0]), device), _to_device(call[1], device)
        label = f"call {i + 1} of {len(calls)} {_describe(args, kwargs)}"
        with _isolated(old, new):
            try:
                want = old(*args, **kwargs)
            except Exception as exc:  # this call is not one the original takes
                first_error = first_error or f"{type(exc).__name__}: {exc}"
                continue
            ran = True
            try:
                got = new(*args, **kwargs)
            except Exception as exc:
                return _Verdict(False, why=f"the swap raised {type(exc).__name__}: {exc} on {label}",
                                same_structure=False, max_diff=math.inf)
        structure, ratio, diff = _compare(got, want)
        if structure is not None:
            return _Verdict(False, why=f"{structure} on {label}", same_structure=False,
                            max_diff=math.inf)
        if ratio > 1 and diff >= worst.max_diff:
            worst = _Verdict(False, why=f"outputs differ by max {diff:.3g} on {label}", max_diff=diff)
    if not ran:
        return _Verdict(False, same_structure=False,
                        why=f"the original raised on every example call (first: {first_error})")
    return worst


# ---------------------------------------------------------------------------------
# convert: plan every swap (verified), then apply them all
# ---------------------------------------------------------------------------------


class _Plan:
    def __init__(self, backend: str, verify: bool):
        self.backend, self.verify = backend, verify
        self.actions: list[Callable[[], None]] = []
        self.path = ""       # the module whose conversion is being built (nested converts)
        self.module: nn.Module | None = None

    def nested_path(self, part: nn.Module) -> str:
        """Where `part` (passed to convert by an entry's fn) sits under the current module."""
        if self.module is not None:
            for name, m in self.module.named_modules():
                if m is part and name:
                    return f"{self.path}.{name}" if self.path else name
        return self.path


_ACTIVE: list[_Plan] = []


def _where(path: str) -> str:
    return f"'{path}'" if path else "the model itself"


def _swap(entry, module: nn.Module, path: str, plan: _Plan) -> nn.Module | None:
    """The verified replacement of `module` from `entry`, or None (left alone)."""
    kind = type(module).__qualname__
    outer = plan.path, plan.module
    plan.path, plan.module = path, module
    mark = len(plan.actions)
    try:
        try:
            candidates = entry.candidates(module, plan.backend, plan.verify)
        except textbook.NotReady as why:
            warnings.warn(f"convert: {_where(path)} ({kind}) looks like a {entry.name} but was "
                          f"left as it is: {why}", ConversionWarning)
            return None
        except Exception as exc:  # the fn's own error, e.g. a setting seqfuse lacks
            exc.add_note(f"(while seqfuse.nn.convert converted {_where(path)}, a {kind})")
            raise
        verdicts = []
        for new, calls in candidates:
            verdict = _verify(module, new, calls) if plan.verify and entry.verify else _Verdict(True)
            if verdict.ok:
                return new
            verdicts.append((new, verdict))
            del plan.actions[mark:]  # what this candidate's fn planned goes with it
    finally:
        plan.path, plan.module = outer
    if not verdicts:
        return None
    if entry.builtin and isinstance(entry, _StructuralEntry):
        close = [(n, v) for n, v in verdicts if v.same_structure]
        if close:  # it runs like the textbook class but computes something else: say so
            new, v = min(close, key=lambda nv: nv[1].max_diff)
            warnings.warn(
                f"convert: {_where(path)} ({kind}) has the structure of a {entry.name} but its "
                f"forward computes something else, so it was left on its own code: {v.why}. "
                f"To silence this, seqfuse.nn.register_conversion({kind}, None)",
                ConversionWarning)
        return None
    new, v = verdicts[0]
    raise ConversionError(f"convert: refusing to swap {_where(path)} ({kind} -> "
                          f"{type(new).__module__}.{type(new).__qualname__}, registered for "
                          f"{entry.name}): {v.why}; the model was left unchanged")


def _plan_module(module: nn.Module, path: str, plan: _Plan) -> nn.Module | None:
    """Plan the conversion of `module`: its replacement (None: it stays, and the swaps of its
    children are in plan.actions)."""
    entry = _entry_for(module)
    if entry is not None:
        new = _swap(entry, module, path, plan)
        if new is not None:
            return new
    elif _structural_allowed(module):
        for structural in _STRUCTURAL:
            new = _swap(structural, module, path, plan)
            if new is not None:
                return new
    if isinstance(module, _ATTENTION):
        # e.g. back from to_torch's 'reference'; its W_q / W_k stay nn.Linear
        plan.actions.append(lambda m=module: setattr(m, "backend", plan.backend))
        return None
    for name, child in list(module.named_children()):
        new = _plan_module(child, f"{path}.{name}" if path else name, plan)
        if new is not None:
            plan.actions.append(lambda m=module, n=name, c=new: setattr(m, n, c))
    return None


def convert(model: nn.Module, backend: str = "auto", *, verify: bool = True) -> nn.Module:
    """Return `model` with its layers swapped for seqfuse's through the conversion registry
    (register_conversion; precedence and verification in this module's docstring): every
    torch.nn.LSTM / GRU / RNN / MultiheadAttention / TransformerEncoderLayer /
    TransformerEncoder by seqfuse's holding the same weights, settings and train/eval modes,
    copies of d2l's AdditiveAttention / DotProductAttention (and so MultiHeadAttention's
    attention) by seqfuse's, and BiLSTM+attention pooling by textbook.AdditivePooling; and
    set seqfuse's own attention modules to `backend`. In place for submodules; a bare layer
    is returned converted. Subclasses of torch's layers are left alone (their forward may
    differ), and so is an encoder layer whose submodules are not torch's own types; their
    children are still converted.

    verify=False skips the runs that check each swap (state_dict keys are still compared).
    Raises ConversionError, leaving the model unchanged, when a registered swap is refused.
    Called from an entry's fn (on parts of the module it converts), convert joins the
    conversion in progress: its backend and verify, its swaps applied with the others."""
    backend = check_backend(backend)
    if _ACTIVE:  # called by an entry's fn: part of the conversion in progress
        outer = _ACTIVE[-1]
        new = _plan_module(model, outer.nested_path(model), outer)
        return model if new is None else new
    plan = _Plan(backend, verify)
    _ACTIVE.append(plan)
    try:
        # New layers initialise their weights (then overwritten) from torch's RNG: that
        # draw must not shift the user's random stream.
        with torch.random.fork_rng(devices=_cuda_indices(model)):
            new = _plan_module(model, "", plan)
    finally:
        _ACTIVE.pop()
    for action in plan.actions:
        action()
    return model if new is None else new


# ---------------------------------------------------------------------------------
# The built-in entries for torch.nn's layers
# ---------------------------------------------------------------------------------

def _recurrent_from_torch(m: nn.LSTM | nn.GRU | nn.RNN, backend: str) -> LSTM | GRU | RNN:
    p = m.weight_ih_l0
    kw = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first, dropout=m.dropout,
              bidirectional=m.bidirectional, device=p.device, dtype=p.dtype, backend=backend)
    if isinstance(m, nn.RNN):
        kw["nonlinearity"] = m.nonlinearity
    if getattr(m, "proj_size", 0):
        kw["proj_size"] = m.proj_size
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




def _randn(gen: torch.Generator, shape: tuple, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=gen).to(like.dtype)


def _recurrent_inputs(m: nn.RNNBase, gen: torch.Generator) -> list:
    B, T = 2, 3
    x = _randn(gen, (B, T, m.input_size) if m.batch_first else (T, B, m.input_size), m.weight_ih_l0)
    return [((x,), {})]


def _mha_inputs(m: nn.MultiheadAttention, gen: torch.Generator) -> list:
    N, L, S = 2, 3, 4
    p = m.out_proj.weight

    def draw(steps, size):
        return _randn(gen, (N, steps, size) if m.batch_first else (steps, N, size), p)
    return [((draw(L, m.embed_dim), draw(S, m.kdim), draw(S, m.vdim)), {})]


def _encoder_inputs(m: nn.TransformerEncoderLayer | nn.TransformerEncoder, gen: torch.Generator) -> list:
    layer = m.layers[0] if isinstance(m, nn.TransformerEncoder) else m
    N, S, E = 2, 3, layer.self_attn.embed_dim
    return [((_randn(gen, (N, S, E) if layer.self_attn.batch_first else (S, N, E),
                     layer.self_attn.out_proj.weight),), {})]


for _cls in _RECURRENT:
    _builtin(_cls, _recurrent_from_torch, _recurrent_inputs)
_builtin(nn.MultiheadAttention, _mha_from_torch, _mha_inputs)
_builtin(nn.TransformerEncoderLayer, _layer_from_torch, _encoder_inputs)
_builtin(nn.TransformerEncoder, _encoder_from_torch, _encoder_inputs)


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
    if m.proj_size:
        kw["proj_size"] = m.proj_size
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
    if isinstance(model, _ATTENTION):
        model.backend = "reference"
        return model
    for name, child in list(model.named_children()):
        setattr(model, name, to_torch(child))
    return model
