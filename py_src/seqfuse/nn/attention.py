"""Attention modules on the fused attention ops:

  AdditiveAttention, DotProductAttention  the classic (d2l) modules, same parameters
  MultiheadAttention                      drop-in for torch.nn.MultiheadAttention

Masks reach the ops in their convention (csrc/attention.h): bool True = attend, or a
float mask added to the scores, plus `valid_lens`. A query row with no key left gives
zeros (output and weights), where the classic modules give uniform weights and torch
gives NaN. An empty batch (no rows, or no queries) gives an empty result of the right
shape, as torch's modules do; no keys at all (K = 0) is an error."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .. import functional, reference
from ..backend import backend_for, check_backend

# ---------------------------------------------------------------------------------
# Shared helpers: argument checks and the unfused weights (computed only when read)
# ---------------------------------------------------------------------------------


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_dropout(dropout) -> float:
    if isinstance(dropout, bool) or not (isinstance(dropout, (int, float)) and 0 <= dropout <= 1):
        raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
    return float(dropout)


def _check_valid_lens(valid_lens, B: int, Q: int, K: int, device) -> Tensor:
    """valid_lens: [B] or [B, Q], any integer dtype (d2l's data pipeline makes int32);
    returns int64 on `device`."""
    if not isinstance(valid_lens, Tensor):
        valid_lens = torch.as_tensor(valid_lens)
    if valid_lens.is_floating_point() or valid_lens.is_complex() or valid_lens.dtype == torch.bool:
        raise TypeError(f"valid_lens must be an integer tensor (int64), got dtype {valid_lens.dtype}")
    if tuple(valid_lens.shape) not in ((B,), (B, Q)):
        raise ValueError(f"valid_lens must have shape [B={B}] or [B, Q]=[{B}, {Q}], got "
                         f"{tuple(valid_lens.shape)}")
    if valid_lens.device.type == "meta":
        # A meta tensor has no values: fine beside meta inputs (shapes only), not else.
        if torch.device(device).type != "meta":
            raise ValueError(f"valid_lens is a meta tensor (it has no values) but the inputs are on "
                             f"{device}")
    elif not torch.compiler.is_compiling() and valid_lens.numel():
        lo, hi = int(valid_lens.min()), int(valid_lens.max())
        if lo < 0:
            raise ValueError(f"valid_lens must be >= 0, got min(valid_lens)={lo}")
        if hi > K:
            raise ValueError(f"valid_lens must be <= K={K} (the number of keys), got "
                             f"max(valid_lens)={hi}")
    return valid_lens.to(device=device, dtype=torch.int64)


EMPTY_ROWS = ("zero", "uniform")


def _check_empty_rows(value) -> str:
    if value not in EMPTY_ROWS:
        raise ValueError(f"empty_rows must be one of {EMPTY_ROWS}, got {value!r}")
    return value


def _uniform_empty_rows(valid_lens: Tensor, values: Tensor, context: Tensor,
                        weights: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """d2l's masked_softmax (-1e6 filled before the softmax) for the rows with no valid key:
    uniform weights 1/K over every key, padding included, so the context is the mean of
    the values. valid_lens: [B] or [B, Q] int64; values [B, K, Dv]; context [B, Q, Dv];
    weights [B, Q, K] or None."""
    empty = (valid_lens == 0).reshape(valid_lens.shape[0], -1, 1)  # [B, 1 or Q, 1]
    context = torch.where(empty, values.mean(dim=1, keepdim=True), context)
    if weights is not None:
        weights = torch.where(empty, torch.full_like(weights, 1.0 / values.shape[1]), weights)
    return context, weights


def _settings_repr(module) -> str:
    """The d2l-style modules' settings that differ from the defaults, for repr."""
    return ", ".join(([f"backend={module.backend!r}"] if module.backend != "auto" else [])
                     + ([f"empty_rows={module.empty_rows!r}"] if getattr(module, "empty_rows", "zero") != "zero"
                        else []))


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def _check_like_params(module: str, w: Tensor, **tensors: Tensor) -> None:
    """Each tensor on the parameters' device, and of their dtype (unless autocast casts)."""
    for name, t in tensors.items():
        if t.device != w.device:
            raise ValueError(f"{name} is on {t.device} but the {module}'s parameters are on {w.device}")
    for name, t in tensors.items():
        if t.dtype != w.dtype and not _autocast_enabled(t.device.type):
            raise TypeError(f"{name} dtype {t.dtype} does not match the {module}'s parameters ({w.dtype})")


def _check_has_keys(keys: Tensor) -> None:
    if keys.shape[1] == 0:
        raise ValueError(f"keys must hold at least one key (K >= 1), got shape {tuple(keys.shape)}")


def _draw_seed() -> int:
    # The fused dropout hashes (seed, index); the seed comes from torch's global RNG so
    # that torch.manual_seed makes training runs repeatable. Under torch.export a data-
    # dependent int cannot be traced; the export's own check then says to use eval mode.
    if torch.compiler.is_exporting():
        return 0
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _check_3d(name: str, t, shape_doc: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be 3-D {shape_doc}, got shape {tuple(t.shape)}")


def _check_qkv_3d(queries, keys, values, q_features: int | None, k_features: int | None) -> None:
    _check_3d("queries", queries, "[B, Q, query_size]")
    _check_3d("keys", keys, "[B, K, key_size]")
    _check_3d("values", values, "[B, K, Dv]")
    if q_features is not None and queries.shape[-1] != q_features:
        raise ValueError(f"queries have {queries.shape[-1]} features, expected {q_features}")
    if k_features is not None and keys.shape[-1] != k_features:
        raise ValueError(f"keys have {keys.shape[-1]} features, expected {k_features}")
    if not (queries.shape[0] == keys.shape[0] == values.shape[0]):
        raise ValueError(f"queries, keys and values must have the same batch size, got shapes "
                         f"{tuple(queries.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}")
    if keys.shape[1] != values.shape[1]:
        raise ValueError(f"keys and values must have the same number of keys K, got "
                         f"{keys.shape[1]} and {values.shape[1]}")


# ---------------------------------------------------------------------------------
# The classic modules
# ---------------------------------------------------------------------------------


class AdditiveAttention(nn.Module):
    """Additive (Bahdanau) attention with the parameters of the classic d2l module:
    W_k [num_hiddens, key_size], W_q [num_hiddens, query_size], w_v [1, num_hiddens]
    (nn.Linear, no bias), dropout an nn.Dropout on the weights.

    forward(queries, keys, values, valid_lens=None):
      queries: [B, Q, query_size]; keys: [B, K, key_size]; values: [B, K, Dv]
      valid_lens: [B] or [B, Q] integer, row (b, q) sees keys k < valid_lens; or None
    Returns context [B, Q, Dv]; `attention_weights` [B, Q, K] keeps the weights before
    dropout. The [B, Q, K, num_hiddens] tanh features are never formed.

    A row with valid_lens 0: empty_rows="zero" (default) gives zero weights and a zero
    context; "uniform" gives what d2l's masked_softmax gives (it fills -1e6, so such a row
    spreads uniformly over all keys): weights 1/K and the mean of the values. convert()
    sets "uniform" when it swaps d2l's class.
    """

    def __init__(self, key_size: int, query_size: int, num_hiddens: int, dropout: float = 0.0,
                 *, backend: str = "auto", device=None, dtype=None, empty_rows: str = "zero"):
        super().__init__()
        for name, value in (("key_size", key_size), ("query_size", query_size),
                            ("num_hiddens", num_hiddens)):
            _check_positive_int(name, value)
        factory = {"device": device, "dtype": dtype}
        self.W_k = nn.Linear(key_size, num_hiddens, bias=False, **factory)
        self.W_q = nn.Linear(query_size, num_hiddens, bias=False, **factory)
        self.w_v = nn.Linear(num_hiddens, 1, bias=False, **factory)
        self.dropout = nn.Dropout(_check_dropout(dropout))
        self.backend = check_backend(backend)
        self.empty_rows = _check_empty_rows(empty_rows)
        self.attention_weights: Tensor | None = None

    def extra_repr(self) -> str:
        return _settings_repr(self)

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor,
                valid_lens: Tensor | None = None) -> Tensor:
        context, weights = self.forward_with_weights(queries, keys, values, valid_lens)
        # d2l's interface: the last call's weights on the module. A model called from several
        # threads must take them from forward_with_weights instead (this attribute is shared).
        self.attention_weights = weights
        return context

    def forward_with_weights(self, queries: Tensor, keys: Tensor, values: Tensor,
                             valid_lens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """forward's context together with this call's weights [B, Q, K] (before dropout),
        without touching `attention_weights`: safe when threads share the module."""
        _check_qkv_3d(queries, keys, values, self.W_q.in_features, self.W_k.in_features)
        _check_like_params("AdditiveAttention", self.W_q.weight, queries=queries, keys=keys,
                           values=values)
        B, Q, K = queries.shape[0], queries.shape[1], keys.shape[1]
        if valid_lens is not None:
            valid_lens = _check_valid_lens(valid_lens, B, Q, K, queries.device)
        if B and Q:
            _check_has_keys(keys)
            attend = functools.partial(functional.additive_attention, backend=backend_for(self.backend, queries))
        else:  # an empty batch: an empty result, as torch.nn's layers give
            attend, valid_lens = reference.additive_attention, None
        context, weights = attend(self.W_q(queries), self.W_k(keys), self.w_v.weight.view(-1),
                                  values, valid_lens)
        if valid_lens is not None and getattr(self, "empty_rows", "zero") == "uniform":
            context, weights = _uniform_empty_rows(valid_lens, values, context, weights)
        if self.training and self.dropout.p > 0:
            # The op's backward takes the gradient of its weights output too.
            return torch.bmm(self.dropout(weights), values), weights
        return context, weights


class DotProductAttention(nn.Module):
    """Scaled dot-product attention with the interface of the classic d2l module, on the
    fused SDPA op (no [B, Q, K] matrix is kept).

    forward(queries, keys, values, valid_lens=None):
      queries: [B, Q, D]; keys: [B, K, D]; values: [B, K, Dv]
      valid_lens: [B] or [B, Q] integer, row (b, q) sees keys k < valid_lens; or None
    Returns [B, Q, Dv] = softmax(queries keys^T / sqrt(D)) values, dropout (self.dropout.p,
    training only) applied to the weights inside the op.

    `attention_weights` ([B, Q, K], before dropout, as d2l) is computed unfused from the
    last call's queries and keys only when it is read; the module keeps references to
    them, not the weights. A row with valid_lens 0 gives zeros with empty_rows="zero"
    (default), or d2l's uniform weights and the mean of the values with "uniform" (as
    AdditiveAttention's; convert() sets it when it swaps d2l's class).
    """

    def __init__(self, dropout: float = 0.0, *, backend: str = "auto", empty_rows: str = "zero"):
        super().__init__()
        self.dropout = nn.Dropout(_check_dropout(dropout))
        self.backend = check_backend(backend)
        self.empty_rows = _check_empty_rows(empty_rows)
        self._last: tuple[Tensor, Tensor, Tensor | None] | None = None

    def extra_repr(self) -> str:
        return _settings_repr(self)

    @property
    def attention_weights(self) -> Tensor | None:
        """[B, Q, K] weights of the last forward (None before the first)."""
        if self._last is None:
            return None
        q, k, valid_lens = self._last
        weights = reference.sdpa_weights(q.unsqueeze(1), k.unsqueeze(1), None, valid_lens).squeeze(1)
        if valid_lens is not None and getattr(self, "empty_rows", "zero") == "uniform":
            empty = (valid_lens == 0).reshape(valid_lens.shape[0], -1, 1)
            weights = torch.where(empty, torch.full_like(weights, 1.0 / k.shape[1]), weights)
        return weights

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor,
                valid_lens: Tensor | None = None) -> Tensor:
        _check_qkv_3d(queries, keys, values, None, None)
        if keys.shape[-1] != queries.shape[-1]:
            raise ValueError(f"queries and keys must have the same feature size D, got "
                             f"{queries.shape[-1]} and {keys.shape[-1]}")
        B, Q, K = queries.shape[0], queries.shape[1], keys.shape[1]
        if valid_lens is not None:
            valid_lens = _check_valid_lens(valid_lens, B, Q, K, queries.device)
        if B and Q:
            _check_has_keys(keys)
            attend = functools.partial(functional.scaled_dot_product_attention,
                                       backend=backend_for(self.backend, queries))
        else:  # an empty batch: an empty result, as torch.nn's layers give
            attend, valid_lens = reference.scaled_dot_product_attention, None
        self._last = (queries, keys, valid_lens)
        p = self.dropout.p if self.training else 0.0
        out = attend(
            queries.unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1), None, valid_lens,
            dropout_p=p if p < 1 else 0.0, seed=_draw_seed() if 0 < p < 1 else 0).squeeze(1)
        if valid_lens is not None and getattr(self, "empty_rows", "zero") == "uniform":
            if p > 0:  # d2l drops the uniform weights themselves, like any others
                fill = torch.bmm(self.dropout(values.new_full((B, Q, K), 1.0 / K)), values)
            else:
                fill = values.mean(dim=1, keepdim=True)
            out = torch.where((valid_lens == 0).reshape(B, -1, 1), fill, out)
        return out * 0.0 if p >= 1 else out  # p = 1 drops every weight, as nn.Dropout does


# ---------------------------------------------------------------------------------
# torch.nn.MultiheadAttention
# ---------------------------------------------------------------------------------


class MultiheadAttention(nn.Module):
    """Drop-in for torch.nn.MultiheadAttention (same constructor, parameter names,
    state_dict keys, initialisation and forward) running attention as the fused SDPA op.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
            average_attn_weights=True, is_causal=False, *, valid_lens=None):
      query: [L, N, E] ([N, L, E] with batch_first) or [L, E] unbatched; key: [S, N, kdim];
      value: [S, N, vdim] (same layouts)
      key_padding_mask: [N, S] ([S] unbatched), bool True = ignore, or float (added)
      attn_mask: [L, S] or [N * num_heads, L, S], bool True = NOT allowed, or float (added)
      is_causal: a hint that attn_mask is the causal mask; as in torch, attn_mask must be
        given with it. The hint is trusted: the op applies its own causal mask and does not
        read attn_mask (ignored with add_bias_kv / add_zero_attn, whose extra key every
        query sees).
      valid_lens: [N] or [N, L] integer ([] or [L] unbatched): query (n, l) sees keys
        s < valid_lens, the cheap form of a right-padding mask; combines with the masks.
    Returns (attn_output like query, weights [N, L, S] averaged over heads, or
    [N, num_heads, L, S], or None when need_weights=False).

    The output always comes from the fused op; the weights, when asked for, are computed
    unfused (with the op's own dropout mask in training, so they match the output).
    Deviations from torch: a query row with no allowed key gives zeros (torch: NaN); the
    output is contiguous in the caller's layout; dropout draws its mask from a hash of a
    seed taken from torch's RNG, so masks differ from torch's; float masks get no gradient.
    """

    __constants__ = ["batch_first"]

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None, *,
                 backend: str = "auto"):
        super().__init__()
        _check_positive_int("embed_dim", embed_dim)
        _check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim} "
                             f"and num_heads={num_heads}")
        for name, value in (("kdim", kdim), ("vdim", vdim)):
            if value is not None:
                _check_positive_int(name, value)
        factory = {"device": device, "dtype": dtype}
        # Attributes and registration order as torch's, so that state_dict keys, their
        # order and (from the same seed) the initial values all agree.
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = _check_dropout(dropout)
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self.backend = check_backend(backend)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            nn.init.xavier_normal_(self.bias_v)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}" if self.backend != "auto" else ""

    # torch's own encoder layer calls this on its self_attn in its inference fast path (a
    # torch layer that convert() left alone may hold one of ours).
    merge_masks = nn.MultiheadAttention.merge_masks

    def _in_projection(self, query, key, value, q_in, k_in, v_in):
        """q_in [N, L, E], k_in [N, S, kdim], v_in [N, S, vdim] -> q, k, v [N, *, E]."""
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if self._qkv_same_embed_dim:
            if query is key and key is value:  # self-attention: one GEMM, as torch
                return F.linear(q_in, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(q_in, w_q, b_q), F.linear(k_in, w_k, b_k), F.linear(v_in, w_v, b_v)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False, *, valid_lens: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None]:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 3-D ([L, N, E], or [N, L, E] with batch_first) or 2-D "
                             f"unbatched [L, E], got shape {tuple(query.shape)}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"key and value must be {query.dim()}-D like query, got shapes "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        batched = query.dim() == 3
        if not batched:  # as a batch of one, in the [N, L, E] layout
            q_in, k_in, v_in = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                if key_padding_mask.dim() != 1:
                    raise ValueError(f"key_padding_mask must be 1-D [S] for unbatched query, got "
                                     f"shape {tuple(key_padding_mask.shape)}")
                key_padding_mask = key_padding_mask.unsqueeze(0)
            if valid_lens is not None:
                valid_lens = torch.as_tensor(valid_lens)
                if valid_lens.dim() > 1:
                    raise ValueError(f"valid_lens must be 0-D or 1-D [L] for unbatched query, got "
                                     f"shape {tuple(valid_lens.shape)}")
                valid_lens = valid_lens.unsqueeze(0)
        elif self.batch_first:
            q_in, k_in, v_in = query, key, value
        else:
            q_in, k_in, v_in = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)

        N, L, S = q_in.shape[0], q_in.shape[1], k_in.shape[1]
        E, H = self.embed_dim, self.num_heads
        self._check_inputs(q_in, k_in, v_in)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                               "Transformer module method `generate_square_subsequent_mask` to "
                               "create this mask.")
        if key_padding_mask is not None:
            self._check_mask("key_padding_mask", key_padding_mask, [(N, S)], query.device)
        if attn_mask is not None:
            self._check_mask("attn_mask", attn_mask, [(L, S), (N * H, L, S)], query.device)
        if valid_lens is not None:
            valid_lens = _check_valid_lens(valid_lens, N, L, S, query.device)

        q, k, v = self._in_projection(query, key, value, q_in, k_in, v_in)
        extra = 0  # key rows appended after the S given ones: every query sees them
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, E).to(k.dtype)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, E).to(v.dtype)], dim=1)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, 1, E)], dim=1)
            v = torch.cat([v, v.new_zeros(N, 1, E)], dim=1)
            extra += 1
        use_causal = is_causal and extra == 0
        mask, valid_lens = self._op_mask(
            None if use_causal else attn_mask, key_padding_mask, valid_lens, N, L, S, extra, q.dtype)

        qh, kh, vh = (t.unflatten(-1, (H, self.head_dim)).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        seed = _draw_seed() if 0 < p < 1 else 0
        # An empty batch (N or L = 0) gives an empty result, as torch's module does.
        attend = functools.partial(functional.scaled_dot_product_attention,
                                   backend=backend_for(self.backend, qh))
        if not (N and L):
            attend, valid_lens = reference.scaled_dot_product_attention, None
        o = attend(qh, kh, vh, mask, valid_lens, use_causal, None, p if p < 1 else 0.0,
                   seed)  # [N, H, L, head_dim]
        if p >= 1:  # every weight dropped, as F.dropout(p=1) does
            o = o * 0.0
        # Out-projection in the caller's layout, so that the output is contiguous there.
        if batched and not self.batch_first:
            o = o.permute(2, 0, 1, 3).reshape(L, N, E)
        else:
            o = o.transpose(1, 2).reshape(N, L, E)
        out = F.linear(o, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        if not need_weights:
            return out, None

        weights = reference.sdpa_weights(qh, kh, mask, valid_lens, use_causal)  # [N, H, L, S + extra]
        if p >= 1:
            weights = weights * 0.0
        elif p > 0:  # the op's own dropout mask, so that output == weights @ v
            keep = reference.sdpa_dropout_keep(seed, tuple(weights.shape), p, weights.device)
            weights = weights * keep / (1.0 - p)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights if batched else weights.squeeze(0))

    # -- argument checks: messages name the argument, expected and actual values --------

    def _check_inputs(self, q_in: Tensor, k_in: Tensor, v_in: Tensor) -> None:
        for name, t, size, dim_name in (("query", q_in, self.embed_dim, "embed_dim"),
                                        ("key", k_in, self.kdim, "kdim"),
                                        ("value", v_in, self.vdim, "vdim")):
            if t.shape[-1] != size:
                raise ValueError(f"{name} has {t.shape[-1]} features in its last dimension, "
                                 f"expected {dim_name}={size}")
        if not (q_in.shape[0] == k_in.shape[0] == v_in.shape[0]):
            raise ValueError(f"query, key and value must have the same batch size, got "
                             f"{q_in.shape[0]}, {k_in.shape[0]} and {v_in.shape[0]}")
        if k_in.shape[1] != v_in.shape[1]:
            raise ValueError(f"key and value must have the same sequence length, got "
                             f"{k_in.shape[1]} and {v_in.shape[1]}")
        if (k_in.shape[1] == 0 and q_in.shape[0] and q_in.shape[1]
                and not (self.bias_k is not None or self.add_zero_attn)):
            raise ValueError("key has no time steps")
        _check_like_params("MultiheadAttention", self.out_proj.weight, query=q_in, key=k_in,
                           value=v_in)

    @staticmethod
    def _check_mask(name: str, mask, shapes: list[tuple[int, ...]], device: torch.device) -> None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(mask).__name__}")
        if mask.device != device:
            raise ValueError(f"{name} is on {mask.device} but query is on {device}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"{name} must be bool or floating point, got dtype {mask.dtype}")
        if tuple(mask.shape) not in shapes:
            expected = " or ".join(str(list(s)) for s in shapes)
            raise ValueError(f"{name} must have shape {expected}, got {list(mask.shape)}")

    def _op_mask(self, attn_mask, key_padding_mask, valid_lens, N, L, S, extra, dtype):
        """torch's masks (bool True = masked out) -> one mask for the op, [*, *, L, S + extra]
        (bool True = attend, or float added when either given mask is float), and the
        valid_lens to pass alongside (folded into the mask when keys were appended)."""
        keeps, adds = [], []
        for m, shape in ((attn_mask, (1, 1, L, S) if attn_mask is not None and attn_mask.dim() == 2
                          else (N, self.num_heads, L, S)),
                         (key_padding_mask, (N, 1, 1, S))):
            if m is None:
                continue
            m = m.reshape(shape)
            (keeps if m.dtype == torch.bool else adds).append(~m if m.dtype == torch.bool else m)
        if extra and valid_lens is not None:
            keeps.append(reference._lens_mask(valid_lens, L, S).unsqueeze(1))
            valid_lens = None
        if extra:  # the appended keys are seen by every query
            keeps = [F.pad(m, (0, extra), value=True) for m in keeps]
            adds = [F.pad(m, (0, extra), value=0.0) for m in adds]
        if adds:
            mask = adds[0].to(dtype)
            for m in adds[1:]:
                mask = mask + m.to(dtype)
            for m in keeps:
                mask = mask + torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(
                    ~m, float("-inf"))
            return mask, valid_lens
        if keeps:
            mask = keeps[0]
            for m in keeps[1:]:
                mask = mask & m
            return mask, valid_lens
        return None, valid_lens
