"""The attention ops, additive_attention and scaled_dot_product_attention: their typed
wrappers, the fakes of the compiled ops, and ONE autograd formula per op, registered on
the compiled op (`seqfuse::<op>`, csrc/) and on its Triton twin (`seqfuse::<op>_triton`,
seqfuse/triton/attention.py) alike. Both twins save the same tensors in the same layouts:
additive attention its weights [B, Q, K], SDPA its softmax_stats [B, H, Q, 2] (each row's
max score and log of its sum of exp(s - max), apart so that a huge finite mask cannot
absorb the sum; (+inf, 0) for a row with no key).

Shapes and mask conventions: csrc/attention.h.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from . import checks
from .recurrent import activation_dtype


def run_sdpa(op, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None,
             valid_lens: Tensor | None, is_causal: bool, scale: float | None, dropout_p: float,
             seed: int) -> Tensor:
    """`op`: the compiled op or its Triton twin (seqfuse.triton calls this with its own)."""
    checks.refuse_forward_ad("scaled_dot_product_attention", "attention", query, key, value, attn_mask)
    checks.refuse_mask_grad("scaled_dot_product_attention", attn_mask)
    output, _ = op(query, key, value, attn_mask, valid_lens, is_causal, scale, dropout_p, seed)
    return output


def run_additive(op, query: Tensor, key: Tensor, w_v: Tensor, value: Tensor,
                 valid_lens: Tensor | None, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """`op`: the compiled op or its Triton twin."""
    checks.refuse_forward_ad("additive_attention", "attention", query, key, w_v, value)
    return op(query, key, w_v, value, valid_lens, mask)


def additive_attention(
    query: Tensor, key: Tensor, w_v: Tensor, value: Tensor, valid_lens: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Masked additive (Bahdanau) attention on projected queries and keys, fused: the
    [B, Q, K, A] tanh features are never formed.

    query: [B, Q, A]; key: [B, K, A]; w_v: [A]; value: [B, K, Dv];
    valid_lens: [B] or [B, Q] int64 (row (b, q) sees keys k < valid_lens) or None;
    mask: bool broadcastable to [B, Q, K] (True = attend) or None.
    Returns context [B, Q, Dv] and weights [B, Q, K]; a row with no valid key gives zeros.
    """
    return run_additive(torch.ops.seqfuse.additive_attention.default, query, key, w_v, value,
                        valid_lens, mask)


def scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
    valid_lens: Tensor | None = None, is_causal: bool = False, scale: float | None = None,
    dropout_p: float = 0.0, seed: int = 0,
) -> Tensor:
    """Masked scaled dot-product attention, flash-style (online softmax over key blocks).

    query: [B, H, Q, D]; key: [B, H, K, D]; value: [B, H, K, Dv];
    attn_mask: bool (True = attend) or floating (added to the scores), broadcastable to
    [B, H, Q, K], or None; valid_lens: [B] or [B, Q] int64 or None; is_causal: key k <= q;
    scale: default 1/sqrt(D); dropout_p, seed: dropout on the weights, the mask a hash of
    (seed, index) (see reference.sdpa_dropout_keep).
    Returns output [B, H, Q, Dv]; a row with no valid key gives zeros.
    """
    return run_sdpa(torch.ops.seqfuse.scaled_dot_product_attention.default, query, key, value,
                    attn_mask, valid_lens, is_causal, scale, dropout_p, seed)


# ---------------------------------------------------------------------------------
# Autograd: one formula per op, for every twin.
# ---------------------------------------------------------------------------------

def register_additive_autograd(forward: str, backward: str) -> None:
    """forward, backward: op names in the seqfuse namespace with additive_attention's
    schemas. No gradient flows to valid_lens or the (bool) mask."""

    def setup_context(ctx, inputs, output):
        query, key, w_v, value, valid_lens, mask = inputs
        ctx.save_for_backward(query, key, w_v, value, output[1], valid_lens, mask)

    def backward_fn(ctx, grad_context, grad_weights):
        query, key, w_v, value, weights, valid_lens, mask = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient to differentiate again
            inputs = (query, key, w_v, value)
            return checks.differentiable_backward(
                lambda: reference.additive_attention(*inputs, valid_lens, mask), inputs,
                ctx.needs_input_grad[:4], (grad_context, grad_weights)) + (None, None)
        if grad_context is None:  # an output that did not reach the loss
            grad_context = query.new_zeros(query.shape[0], query.shape[1], value.shape[2])
        if grad_weights is None:
            grad_weights = torch.zeros_like(weights)
        gq, gk, gw, gv = getattr(torch.ops.seqfuse, backward).default(
            grad_context, grad_weights, query, key, w_v, value, weights)
        return gq, gk, gw, gv, None, None

    torch.library.register_autograd(f"seqfuse::{forward}", backward_fn, setup_context=setup_context)
    checks.refuse_double_backward(forward, backward)


def register_sdpa_autograd(forward: str, backward: str) -> None:
    """As register_additive_autograd, for scaled_dot_product_attention's schemas."""

    def setup_context(ctx, inputs, output):
        query, key, value, attn_mask, valid_lens, is_causal, scale, dropout_p, seed = inputs
        ctx.args = (is_causal, scale, dropout_p, seed)
        ctx.save_for_backward(query, key, value, attn_mask, valid_lens, *output)

    def backward_fn(ctx, grad_output, _grad_stats):
        query, key, value, attn_mask, valid_lens, out, stats = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            inputs = (query, key, value)
            return checks.differentiable_backward(
                lambda: (reference.scaled_dot_product_attention(
                    *inputs, attn_mask, valid_lens, *ctx.args),), inputs,
                ctx.needs_input_grad[:3], (grad_output,)) + (None,) * 6
        if grad_output is None:
            grad_output = torch.zeros_like(out)
        gq, gk, gv = getattr(torch.ops.seqfuse, backward).default(
            grad_output, query, key, value, attn_mask, valid_lens, out, stats, *ctx.args)
        # No gradient for a floating attn_mask: run_sdpa refuses a mask that requires one.
        return gq, gk, gv, None, None, None, None, None, None

    torch.library.register_autograd(f"seqfuse::{forward}", backward_fn, setup_context=setup_context)
    checks.refuse_double_backward(forward, backward)


# ---------------------------------------------------------------------------------
# Fakes of the compiled ops (see recurrent.py for why they check devices).
# ---------------------------------------------------------------------------------

def register_compiled() -> None:
    """Fakes and autograd of the compiled ops (only once seqfuse._C has declared them)."""

    @torch.library.register_fake("seqfuse::additive_attention")
    def _additive_attention_fake(query, key, w_v, value, valid_lens, mask):
        checks.same_device("additive_attention", "input", query, key=key, w_v=w_v, value=value,
                           valid_lens=valid_lens, mask=mask)
        B, Q, _ = query.shape
        K, Dv = value.shape[1], value.shape[2]
        return query.new_empty(B, Q, Dv), query.new_empty(B, Q, K)

    @torch.library.register_fake("seqfuse::additive_attention_backward")
    def _additive_attention_backward_fake(grad_context, grad_weights, query, key, w_v, value,
                                          weights):
        checks.same_device("additive_attention_backward", "input", query,
                           grad_context=grad_context, grad_weights=grad_weights, key=key, w_v=w_v,
                           value=value, weights=weights)
        return (torch.empty_like(query), torch.empty_like(key), torch.empty_like(w_v),
                torch.empty_like(value))

    @torch.library.register_fake("seqfuse::scaled_dot_product_attention")
    def _sdpa_fake(query, key, value, attn_mask, valid_lens, is_causal=False, scale=None,
                   dropout_p=0.0, seed=0):
        checks.same_device("scaled_dot_product_attention", "input", query, key=key, value=value,
                           attn_mask=attn_mask, valid_lens=valid_lens)
        B, H, Q, _ = query.shape
        return (query.new_empty(B, H, Q, value.shape[3]),
                query.new_empty(B, H, Q, 2, dtype=activation_dtype(query)))

    @torch.library.register_fake("seqfuse::scaled_dot_product_attention_backward")
    def _sdpa_backward_fake(grad_output, query, key, value, attn_mask, valid_lens, output,
                            softmax_stats, is_causal, scale, dropout_p, seed):
        checks.same_device("scaled_dot_product_attention_backward", "input", query,
                           grad_output=grad_output, key=key, value=value, attn_mask=attn_mask,
                           valid_lens=valid_lens, output=output, softmax_stats=softmax_stats)
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)

    register_additive_autograd("additive_attention", "additive_attention_backward")
    register_sdpa_autograd("scaled_dot_product_attention", "scaled_dot_product_attention_backward")
