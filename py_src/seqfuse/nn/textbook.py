"""convert()'s built-in matchers for the textbook attention classes that users copy into
their own code (so no class of ours can be registered for them), recognised by structure:

  additive_candidates     d2l's AdditiveAttention: W_k, W_q, w_v (nn.Linear, no bias), dropout
  dot_product_candidates  d2l's DotProductAttention: one nn.Dropout, no parameters
  pooling_candidates      the additive pooling of BiLSTM+attention classifiers:
                          score_t = v . tanh(W h_t (+ b)), masked softmax over t, sum of h_t

Each takes (module, backend) and returns candidates [(new_module, example_calls)]: an
empty list when the structure does not fit. The structure (child types, shapes, bias
presence, the forward's arity) only proposes a swap; what forward computes is decided by
convert, which runs each candidate against the module on the example calls and keeps the
first that agrees. d2l's MultiHeadAttention needs no entry of its own: its `attention`
child is a DotProductAttention, swapped by the second matcher, and the rest of its forward
(four projections and head reshapes) is already GEMMs and views.

The swaps reuse the module's own nn.Linear / nn.Dropout children (same parameters, so an
optimizer built before convert still holds them) under the same attribute names, so
state_dict keys do not change.

example_calls: [(args, kwargs)], tensors on the CPU; convert moves them to the module's
device. A row with no valid key gets uniform weights over all keys (padding included) in
d2l's masked_softmax, which fills -1e6: the d2l swaps are made with empty_rows="uniform",
which gives the same, and their example calls include valid_lens 0. The pooling's lengths
are >= 1 (a classified sequence has a token; its -1e9 or -inf fills differ there).
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from .. import functional
from ..backend import backend_for, check_backend
from .attention import AdditiveAttention, DotProductAttention

B, Q, K, DV = 3, 2, 5, 6     # example sizes: odd, Q != K, so a transposed axis shows
LENS_1D = (1, K, 0)          # valid_lens [B]: one key, all keys, none
LENS_2D = ((1, K), (0, 4), (K, 0))


class NotReady(Exception):
    """The module has the structure but cannot be converted yet (the message says why)."""


def _binds(module: nn.Module, n: int) -> bool:
    """Whether module.forward takes `n` positional arguments."""
    try:
        inspect.signature(module.forward).bind(*range(n))
    except (TypeError, ValueError):
        return False
    return True


def _dtype(module: nn.Module) -> torch.dtype:
    p = next(module.parameters(), None)
    return torch.get_default_dtype() if p is None else p.dtype


def _randn(gen: torch.Generator, *shape: int, dtype) -> Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def _check_not_lazy(module: nn.Module) -> None:
    if any(is_lazy(p) for p in module.parameters()):
        raise NotReady("its lazy parameters are not initialized yet (d2l's nn.LazyLinear): run "
                       "the model on one batch before convert")


def _valid_lens_calls(q: Tensor, k: Tensor, v: Tensor) -> list[tuple[tuple, dict]]:
    return [((q, k, v, None), {}),
            ((q, k, v, torch.tensor(LENS_1D)), {}),
            ((q, k, v, torch.tensor(LENS_2D)), {})]


def _no_bias_linear(m) -> bool:
    return type(m) is nn.Linear and m.bias is None


def _own(module: nn.Module) -> tuple[dict, dict]:
    """The module's direct parameters and buffers (not its children's)."""
    return dict(module.named_parameters(recurse=False)), dict(module.named_buffers(recurse=False))


# ---------------------------------------------------------------------------------
# d2l's AdditiveAttention and DotProductAttention -> seqfuse's
# ---------------------------------------------------------------------------------

def additive_candidates(module: nn.Module, backend: str) -> list:
    """d2l: W_k [H, key_size], W_q [H, query_size], w_v [1, H] (nn.Linear, no bias) and an
    optional nn.Dropout `dropout`; forward(queries, keys, values, valid_lens). The names
    are d2l's and seqfuse's, which keeps the state_dict keys."""
    children = dict(module.named_children())
    if set(children) - {"dropout"} != {"W_k", "W_q", "w_v"} or any(_own(module)):
        return []
    W_k, W_q, w_v, dropout = (children.get(n) for n in ("W_k", "W_q", "w_v", "dropout"))
    if dropout is not None and type(dropout) is not nn.Dropout:
        return []
    if not all(isinstance(m, (nn.Linear, nn.LazyLinear)) and m.bias is None for m in (W_k, W_q, w_v)):
        return []
    if not _binds(module, 4):
        return []
    _check_not_lazy(module)
    H = W_k.out_features
    if not (_no_bias_linear(W_k) and _no_bias_linear(W_q) and _no_bias_linear(w_v)
            and W_q.out_features == H and w_v.in_features == H and w_v.out_features == 1):
        return []
    new = AdditiveAttention(W_k.in_features, W_q.in_features, H, backend=backend, device="meta",
                            empty_rows="uniform")
    new.W_k, new.W_q, new.w_v = W_k, W_q, w_v
    if dropout is not None:
        new.dropout = dropout
    new.training = module.training
    gen, dt = torch.Generator().manual_seed(0), _dtype(module)
    calls = _valid_lens_calls(_randn(gen, B, Q, W_q.in_features, dtype=dt),
                              _randn(gen, B, K, W_k.in_features, dtype=dt), _randn(gen, B, K, DV, dtype=dt))
    return [(new, calls)]


def dot_product_candidates(module: nn.Module, backend: str) -> list:
    """d2l: one nn.Dropout child and no parameters or buffers; forward(queries, keys,
    values, valid_lens=None) = softmax(q k^T / sqrt(d), masked) v."""
    children = list(module.children())
    if len(children) != 1 or type(children[0]) is not nn.Dropout or any(_own(module)):
        return []
    if not _binds(module, 4):
        return []
    new = DotProductAttention(backend=backend, empty_rows="uniform")
    new.dropout = children[0]
    new.training = module.training
    gen, D = torch.Generator().manual_seed(0), 4
    dt = torch.get_default_dtype()
    calls = _valid_lens_calls(_randn(gen, B, Q, D, dtype=dt), _randn(gen, B, K, D, dtype=dt),
                              _randn(gen, B, K, DV, dtype=dt))
    return [(new, calls)]


# ---------------------------------------------------------------------------------
# BiLSTM+attention pooling -> AdditivePooling (the fused additive op, one query)
# ---------------------------------------------------------------------------------

# How the pooling's optional second argument reads: a mask whose nonzero entries are the
# valid steps, a mask whose nonzero entries are padding, or lengths [B].
EXTRA_FORMS = ("mask", "padding_mask", "lengths")


class AdditivePooling(nn.Module):
    """Masked additive attention pooling over time on the fused additive-attention op,
    holding a user module's parameters under the user's names:

      score_t = v . tanh(W h_t + b), weights = softmax over the valid t, pooled = sum_t w_t h_t

    W h + b is split as the op wants it: W h_t is the keys' projection, b the one query's.
    forward(h [B, T, F], extra=None) with `extra` per `extra_form` ("mask" / "padding_mask":
    [B, T], any dtype, nonzero = valid / padding; "lengths": [B] integer; None: every step),
    passed positionally or under `extra_name`. Returns pooled [B, F], and the weights [B, T]
    too when `returns_weights`. A row with no valid step gets zeros."""

    def __init__(self, proj_name: str, proj: nn.Linear, score_name: str, score: nn.Linear | nn.Parameter,
                 extra_form: str | None, extra_name: str | None, returns_weights: bool,
                 backend: str = "auto"):
        super().__init__()
        if extra_form not in (None, *EXTRA_FORMS):
            raise ValueError(f"extra_form must be None or one of {EXTRA_FORMS}, got {extra_form!r}")
        setattr(self, proj_name, proj)
        if isinstance(score, nn.Parameter):
            self.register_parameter(score_name, score)
        else:
            setattr(self, score_name, score)
        self.proj_name, self.score_name = proj_name, score_name
        self.extra_form, self.extra_name = extra_form, extra_name
        self.returns_weights = returns_weights
        self.backend = check_backend(backend)

    def extra_repr(self) -> str:
        return (f"extra_form={self.extra_form!r}, returns_weights={self.returns_weights}, "
                f"backend={self.backend!r}")

    def forward(self, h: Tensor, *args, **kwargs):
        if len(args) > 1 or (args and kwargs) or set(kwargs) - {self.extra_name}:
            raise TypeError(f"AdditivePooling.forward takes (h, {self.extra_name or ''}), got "
                            f"{len(args)} more positional and keywords {sorted(kwargs)}")
        extra = args[0] if args else kwargs.get(self.extra_name)
        if not isinstance(h, Tensor) or h.dim() != 3:
            raise ValueError(f"h must be a 3-D Tensor [B, T, F], got "
                             f"{tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__}")
        proj = getattr(self, self.proj_name)
        score = getattr(self, self.score_name)
        w_v = (score.weight if isinstance(score, nn.Linear) else score).reshape(-1)
        N, T = h.shape[0], h.shape[1]
        keys = torch.nn.functional.linear(h, proj.weight)                        # [B, T, A]
        query = (proj.bias if proj.bias is not None else keys.new_zeros(keys.shape[-1]))
        query = query.to(keys.dtype).expand(N, 1, keys.shape[-1])                # [B, 1, A]
        valid_lens = mask = None
        if extra is not None and self.extra_form is not None:
            if self.extra_form == "lengths":
                valid_lens = extra
            else:
                if tuple(extra.shape) != (N, T):
                    raise ValueError(f"{self.extra_name} must have shape [B, T]=[{N}, {T}], got "
                                     f"{tuple(extra.shape)}")
                keep = extra != 0 if self.extra_form == "mask" else extra == 0
                mask = keep.unsqueeze(1)                                         # [B, 1, T]
        pooled, weights = functional.additive_attention(query, keys, w_v, h, valid_lens, mask,
                                                        backend=backend_for(self.backend, h))
        pooled, weights = pooled.squeeze(1), weights.squeeze(1)
        return (pooled, weights) if self.returns_weights else pooled


def _pooling_parts(module: nn.Module):
    """(proj name, proj, score name, score) when the module holds exactly a projection
    nn.Linear(F, A) and a score vector (nn.Linear(A, 1, bias=False) or a parameter [A] /
    [A, 1]), and nothing else; else None."""
    params, buffers = _own(module)
    children = dict(module.named_children())
    if buffers or not all(type(m) is nn.Linear for m in children.values()):
        return None
    if len(children) == 2 and not params:
        (n1, m1), (n2, m2) = children.items()
        if m2.out_features != 1 or m2.bias is not None or m2.in_features != m1.out_features:
            (n1, m1), (n2, m2) = (n2, m2), (n1, m1)
        if m2.out_features == 1 and m2.bias is None and m2.in_features == m1.out_features:
            return n1, m1, n2, m2
        return None
    if len(children) == 1 and len(params) == 1:
        (n1, m1), (n2, p) = next(iter(children.items())), next(iter(params.items()))
        if tuple(p.shape) in ((m1.out_features,), (m1.out_features, 1)):
            return n1, m1, n2, p
    return None


def pooling_candidates(module: nn.Module, backend: str) -> list:
    """forward(h [B, T, F]) or forward(h, mask-or-lengths) returning pooled [B, F] or
    (pooled, weights [B, T]). Which of those the module's forward is, is what the run
    tells: one candidate per reading."""
    parts = _pooling_parts(module)  # (an uninitialized nn.LazyLinear is not an nn.Linear)
    if parts is None or hasattr(AdditivePooling, parts[0]) or hasattr(AdditivePooling, parts[2]):
        return []
    proj_name, proj, score_name, score = parts
    takes_two = _binds(module, 2)
    if not (_binds(module, 1) or takes_two):
        return []
    params = list(inspect.signature(module.forward).parameters.values())
    extra_name = params[1].name if takes_two and len(params) > 1 else None
    gen, dt = torch.Generator().manual_seed(0), _dtype(module)
    T = K
    h = _randn(gen, B, T, proj.in_features, dtype=dt)
    # No row all valid or all padding under either mask polarity (those rows are where
    # the textbook fills and seqfuse's zeros differ).
    lengths = torch.tensor((4, 1, 3))
    valid = torch.arange(T) < lengths[:, None]                                   # [B, T]
    forms = [None] if not takes_two else list(EXTRA_FORMS)
    candidates = []
    for form in forms:
        if form is None:
            calls = [((h,), {})]
        elif form == "lengths":
            calls = [((h, lengths), {})]
        else:
            m = valid if form == "mask" else ~valid
            calls = [((h, m), {}), ((h, m.to(dt)), {})]  # bool or 0/1 float, whichever it takes
        for returns_weights in (True, False):
            new = AdditivePooling(proj_name, proj, score_name, score, form, extra_name,
                                  returns_weights, backend)
            new.training = module.training
            candidates.append((new, calls))
    return candidates


# In the order convert tries them: the most specific structure first.
STRUCTURAL = (("d2l AdditiveAttention", additive_candidates),
              ("d2l DotProductAttention", dot_product_candidates),
              ("additive attention pooling", pooling_candidates))
