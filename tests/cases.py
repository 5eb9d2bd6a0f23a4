"""The case tables the op tests share, whatever the backend and device: the recurrent ops
(one Kind per op), shapes with odd sizes, length patterns with length-1 rows, the attention
mask forms with fully masked rows, dtypes and tolerances. tests/ops (native, triton,
reference on CPU, triton on a GPU) and tests/cuda (the CUDA kernels) import them from here;
tests/conftest.py re-exports TOL.

Shapes come in two sizes: the compiled kernels run the full tables; Triton's interpreter
(no GPU) is slow, so the Triton tests take the small ones, whose sizes still cross its
16-wide blocks."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

# ---------------------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------------------

# Per-dtype tolerances against eager PyTorch on the same dtype (outputs: absolute;
# gradients: relative).
TOL = {
    torch.float32: {"out_atol": 1e-5, "grad_rtol": 1e-4, "grad_atol": 1e-5},
    torch.float64: {"out_atol": 1e-10, "grad_rtol": 1e-8, "grad_atol": 1e-10},
}

# Attention outputs and gradients against the reference, per (backend, dtype): the
# compiled CPU kernels at 10x the output tolerance; Triton's float32 with 2x slack on the
# compiled ops' gradient tolerance for its exp2-domain softmax.
ATTN_TOL = {
    ("native", torch.float32): {"atol": TOL[torch.float32]["out_atol"] * 10,
                                "rtol": TOL[torch.float32]["grad_rtol"]},
    ("native", torch.float64): {"atol": TOL[torch.float64]["out_atol"] * 10,
                                "rtol": TOL[torch.float64]["grad_rtol"]},
    ("triton", torch.float32): {"atol": 2e-5, "rtol": 1e-4},
}

# The CUDA recurrent kernels (tests/cuda): max |error| / max(1, max |reference|) against a
# float64 reference, for outputs and for gradients. The half types' results are rounded
# once (states and the backward stay float32): a few ulps of the scale.
CUDA_LAYER_TOL = {
    torch.float64: {"out": 1e-10, "grad": 1e-9},
    torch.float32: {"out": 5e-5, "grad": 2e-4},
    torch.float16: {"out": 4e-3, "grad": 1e-2},
    torch.bfloat16: {"out": 2e-2, "grad": 5e-2},
}
# The CUDA attention kernels, same-dtype comparisons: outputs absolute, gradients relative.
CUDA_ATTN_TOL = {torch.float32: {"atol": 2e-4, "rtol": 2e-4},
                 torch.float64: {"atol": 1e-9, "rtol": 1e-7}}
# The floor of the "2x eager" bound of the half types on CUDA, relative to the reference's
# largest magnitude (about one rounding of the dtype).
CUDA_HALF_EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}

# Same-dtype comparisons per backend; the half types go by "within 2x of eager's error".
EXACT_DTYPES = {"native": [torch.float32, torch.float64], "triton": [torch.float32]}
# Floors of the "2x eager" bound on CPU and in Triton, relative to the reference's largest
# magnitude.
HALF_FLOOR = {torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -12}

# ---------------------------------------------------------------------------------------
# Recurrent layers
# ---------------------------------------------------------------------------------------


def backend_op(backend: str, op_name: str):
    """The backend's public function for `op_name`: seqfuse.ops (native), seqfuse.triton,
    or the reference through seqfuse.functional, whose check layer gives it the compiled
    ops' argument checks."""
    if backend == "native":
        from seqfuse import ops
        return getattr(ops, op_name)
    if backend == "triton":
        import seqfuse.triton
        return getattr(seqfuse.triton, op_name)
    from seqfuse import functional
    return functools.partial(getattr(functional, op_name), backend=backend)


def raw_op(backend: str, op_name: str):
    """torch.ops.seqfuse.<op_name>[_triton].default (op_name may end in _backward)."""
    if backend == "triton":
        import seqfuse.triton  # noqa: F401  (registers the *_triton ops)
        op_name += "_triton"
    return getattr(torch.ops.seqfuse, op_name).default


@dataclass(frozen=True)
class Kind:
    """One recurrent op, its argument list described once, bound to one backend:
    [input, weight_ih, weight_hh, *biases, *states, lengths, *extra]."""
    name: str
    op_name: str               # lstm_layer, gru_layer, rnn_layer
    gates: int                 # gate blocks in the weights
    biases: tuple[str, ...]    # names of the bias arguments
    states: tuple[str, ...]    # names of the initial-state arguments
    extra: tuple = ()          # trailing non-tensor arguments (the RNN's nonlinearity)
    keep_flag: bool = True     # the raw op takes keep_activations
    backend: str = "native"    # what op, raw and backward run

    def on(self, backend: str) -> Kind:
        return dataclasses.replace(self, backend=backend)

    @property
    def op(self):
        """The backend's public function (backend_op)."""
        return backend_op(self.backend, self.op_name)

    @property
    def ref(self):
        """Eager PyTorch (seqfuse.reference), the oracle."""
        from seqfuse import reference
        return getattr(reference, self.op_name)

    @property
    def raw(self):
        """torch.ops.seqfuse.<op>[_triton].default"""
        return raw_op(self.backend, self.op_name)

    @property
    def backward(self):
        """torch.ops.seqfuse.<op>_backward[_triton].default"""
        return raw_op(self.backend, self.op_name + "_backward")

    def raw_args(self, args, keep=True):
        return (*args, keep) if self.keep_flag else tuple(args)

    def make_args(self, T, B, I, H, D, dtype=torch.float32, device="cpu", bias=True,
                  lengths=None, requires_grad=False):
        """[input, weight_ih, weight_hh, *biases, *states, lengths, *extra]; lengths: None,
        a list or a tensor (made int64, on the CPU)."""
        # Weights at about twice torch.nn's init scale (U(+-1/sqrt(H))): the recurrence is
        # stable, so rounding differences are not amplified step after step.
        def p(*shape):
            return (torch.randn(*shape) * H ** -0.5).to(device, dtype).requires_grad_(requires_grad)

        def r(*shape):
            return torch.randn(*shape).to(device, dtype).requires_grad_(requires_grad)
        G = self.gates * H
        bs = [p(D, G) if bias else None for _ in self.biases]
        lengths = None if lengths is None else torch.as_tensor(lengths, dtype=torch.int64)
        return [r(T, B, I), p(D, G, I), p(D, G, H), *bs, *[r(D, B, H) for _ in self.states],
                lengths, *self.extra]

    @property
    def lengths_at(self) -> int:
        return 3 + len(self.biases) + len(self.states)

    def tensors(self, args):
        """The differentiable arguments (no lengths, no absent biases)."""
        return [t for t in args[:self.lengths_at] if t is not None]


KINDS = [
    Kind("lstm", "lstm_layer", 4, ("bias",), ("hx", "cx")),
    Kind("gru", "gru_layer", 3, ("bias_ih", "bias_hh"), ("hx",)),
    Kind("rnn-tanh", "rnn_layer", 1, ("bias",), ("hx",), ("tanh",), keep_flag=False),
    Kind("rnn-relu", "rnn_layer", 1, ("bias",), ("hx",), ("relu",), keep_flag=False),
]
KIND_IDS = [k.name for k in KINDS]

# The compiled kernels' grid: T, B, I, H, each with D in {1, 2}, bias or not, and lengths
# none or random with a length-1 row.
LAYER_SHAPES = [
    (1, 1, 1, 1),
    (7, 3, 37, 53),   # odd sizes, not multiples of the vector width
    (5, 1, 16, 128),  # batch 1 with two threads splitting H
    (9, 6, 20, 33),   # a full 6-row tile and more
    (4, 2, 8, 17),
    (6, 30, 20, 40),  # enough rows for threads to split rows instead of units
    (4, 13, 9, 70),   # units split over threads, ragged last tile in the backward
]

# Small cases (T, B, I, H, D, bias, lengths) for Triton's interpreter, whose blocks are 16
# wide: H=20 spans two unit blocks and two K-chunks, B=18 two row blocks.
LAYER_SMALL_CASES = {
    # ragged: a length-1 row and a full-length one
    "ragged-bidir": (5, 3, 13, 20, 2, True, [5, 1, 3]),
    "one-direction-no-bias": (5, 3, 13, 24, 1, False, None),
    "T1": (1, 2, 7, 20, 2, True, None),
    "two-row-blocks": (3, 18, 5, 8, 2, True, [3, 1, 2] * 6),
}

# Length patterns over 4 rows of T=6 steps (tests/cuda).
LAYER_LENGTHS = {
    "none": None,
    "ragged": [6, 1, 4, 6],   # length 1, ties, the longest = T
    "short": [5, 1, 3, 2],    # every row ends before T: steps past the longest never run
}
LAYER_HIDDEN = [20, 256, 1024]  # odd; in the persistent CUDA kernel's range; past it

# ---------------------------------------------------------------------------------------
# Additive attention
# ---------------------------------------------------------------------------------------

ADD_SHAPES = [  # B, Q, K, A, Dv
    (3, 5, 7, 19, 6),
    (2, 1, 33, 40, 5),     # one decoder step, A with a ragged vector tail
    (2, 4, 1, 8, 3),       # a single key
    (1, 9, 17, 1, 1),
    (4, 6, 65, 32, 17),
]
ADD_SHAPES_SMALL = [  # the interpreter's (16-wide blocks)
    (2, 5, 7, 24, 6),
    (2, 1, 37, 20, 5),     # one decoder step over three key blocks, A with a ragged chunk
    (2, 4, 1, 8, 3),       # a single key
    (1, 9, 17, 1, 1),
    (2, 18, 33, 24, 17),   # two query blocks x three key blocks x two A chunks (one ragged)
]


def add_shapes(B, Q, K, A, Dv):
    """query, key, w_v, value."""
    return ((B, Q, A), (B, K, A), (A,), (B, K, Dv))


def add_masks(B, Q, K):
    """(name, valid_lens, mask) for every accepted form, on the CPU; rows with no key in
    both length forms."""
    lens_b = torch.randint(0, K + 1, (B,))
    lens_b[0] = 0
    lens_bq = torch.randint(0, K + 1, (B, Q))
    lens_bq[-1, 0] = 0
    return [
        ("none", None, None),
        ("lens[B]", lens_b, None),
        ("lens[B,Q]", lens_bq, None),
        ("lens full", torch.full((B,), K), None),
        ("mask[B,Q,K]", None, torch.rand(B, Q, K) > 0.4),
        ("mask[B,1,K]", None, torch.rand(B, 1, K) > 0.3),
        ("mask[K]+lens", lens_bq, torch.rand(K) > 0.2),
        ("mask[Q,K]", None, torch.rand(Q, K) > 0.5),
    ]

# ---------------------------------------------------------------------------------------
# Scaled dot-product attention
# ---------------------------------------------------------------------------------------


SDPA_SHAPES = [  # B, H, Q, K, D, Dv
    (2, 3, 5, 7, 8, 6),
    (1, 2, 59, 97, 17, 33),   # odd sizes, ragged tiles and vector tails
    (2, 1, 1, 1, 4, 4),       # one query, one key
    (2, 2, 1, 300, 64, 64),   # one decoder step over several key blocks
    (1, 1, 70, 520, 16, 8),   # many key blocks (online softmax rescaling)
]
SDPA_SHAPES_SMALL = [  # the interpreter's (16-wide blocks)
    (2, 2, 5, 7, 24, 20),     # head dims that are not powers of two
    (1, 2, 37, 40, 16, 8),    # three query blocks x three key blocks (online rescaling)
    (2, 1, 1, 1, 4, 4),       # one query, one key
    (2, 2, 1, 37, 20, 12),    # one decoder step over three key blocks
    (1, 1, 33, 20, 32, 32),   # more queries than keys (causal rows past K see every key)
]


def sdpa_shapes(B, H, Q, K, D, Dv):
    """query, key, value."""
    return ((B, H, Q, D), (B, H, K, D), (B, H, K, Dv))


def sdpa_masks(B, H, Q, K, dtype=torch.float32):
    """(name, kwargs) for every accepted mask form and switch, on the CPU; some rows have
    no key (the last batch's lengths, one [B, Q] length, the float mask's first row)."""
    lens_b = torch.randint(0, K + 1, (B,))
    lens_b[-1] = 0 if B > 1 else lens_b[-1]
    lens_bq = torch.randint(0, K + 1, (B, Q))
    lens_bq[0, 0] = 0
    pad = torch.arange(K) < torch.randint(1, K + 1, (B,))[:, None]
    additive = torch.randn(1, H, Q, K, dtype=torch.float64).to(dtype)
    additive[..., 0, :] = float("-inf")  # first query row fully masked
    additive[..., 1::2, (K + 1) // 2:] = float("-inf")  # odd rows end halfway
    additive[..., -1, : K // 2] = float("-inf")  # the last row starts halfway
    return [
        ("none", {}),
        ("lens[B]", {"valid_lens": lens_b}),
        ("lens[B,Q]", {"valid_lens": lens_bq}),
        ("bool[B,1,1,K]", {"attn_mask": pad.view(B, 1, 1, K)}),
        ("bool[B,1,Q,K]", {"attn_mask": torch.rand(B, 1, Q, K) > 0.3}),
        ("bool[Q,K]", {"attn_mask": torch.rand(Q, K) > 0.5}),
        ("bool[B,H,Q,K]", {"attn_mask": torch.rand(B, H, Q, K) > 0.7}),
        ("bool[K]", {"attn_mask": torch.rand(K) > 0.3}),
        ("float[1,H,Q,K]", {"attn_mask": additive}),
        ("float[Q,K]", {"attn_mask": torch.randn(Q, K, dtype=torch.float64).to(dtype)}),
        ("causal", {"is_causal": True}),
        ("causal+lens+scale", {"is_causal": True, "valid_lens": lens_b, "scale": 0.3}),
        ("bool+lens[B,Q]+causal", {"attn_mask": pad.view(B, 1, 1, K), "is_causal": True,
                                   "valid_lens": torch.randint(0, K + 1, (B, Q))}),
        ("dropout", {"dropout_p": 0.3, "seed": 1234}),
        ("dropout+bool+causal", {"dropout_p": 0.5, "seed": 7, "is_causal": True,
                                 "attn_mask": pad.view(B, 1, 1, K)}),
    ]


def sdpa_reference_lse(q, k, attn_mask=None, valid_lens=None, is_causal=False, scale=None, **_):
    """logsumexp [B, H, Q] of the masked, scaled scores (dropout does not change it), in
    float64; +inf on rows with no key (the ops' convention)."""
    from seqfuse import reference

    q, k = q.detach().double(), k.detach().double()
    Q, D = q.shape[-2:]
    K = k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (D ** -0.5 if scale is None else scale)
    keep = torch.ones(Q, K, dtype=torch.bool, device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = keep & attn_mask
        else:
            scores = scores + attn_mask.double()
            keep = keep & (attn_mask > float("-inf"))
    if valid_lens is not None:
        keep = keep & reference._lens_mask(valid_lens.to(q.device), Q, K).unsqueeze(1)
    if is_causal:
        keep = keep & torch.ones(Q, K, dtype=torch.bool, device=q.device).tril()
    keep = keep.expand_as(scores)
    lse = torch.logsumexp(scores.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.where(keep.any(-1), lse, torch.full_like(lse, float("inf")))
