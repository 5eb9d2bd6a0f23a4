import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter, which
# is chosen when triton is first imported: set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import seqfuse  # noqa: F401
from cases import TOL  # noqa: F401  (the shared case tables; TOL re-exported for older imports)

# Small random-weight configs of every zoo model, odd sizes (tests/models, tests/export).
ZOO_V, ZOO_TGT_V, ZOO_T = 13, 11, 7   # (source) vocabulary, seq2seq target vocabulary, steps
# Dropout is 0 so that train-mode gradients are deterministic and comparable.
ZOO_CONFIGS = {
    "lstm-classifier": dict(vocab_size=ZOO_V, embed_dim=7, hidden_size=9, num_classes=3, num_layers=2,
                            bidirectional=True),
    "bilstm-classifier": dict(vocab_size=ZOO_V, embed_dim=7, hidden_size=9, num_classes=3),
    "bilstm-attention": dict(vocab_size=ZOO_V, embed_dim=7, hidden_size=9, num_classes=3, attention_size=5),
    "bigru-classifier": dict(vocab_size=ZOO_V, embed_dim=7, hidden_size=9, num_classes=3),
    "transformer-classifier": dict(vocab_size=ZOO_V, d_model=12, num_classes=3, nhead=3, num_layers=2,
                                   dim_feedforward=13, max_len=16, dropout=0.0),
    "lstm-rows": dict(hidden_size=9, num_classes=3, rows=ZOO_T, cols=5),
    "lstm-regressor": dict(num_features=5, hidden_size=9, num_layers=2, dropout=0.0),
    "lstm-tagger": dict(vocab_size=ZOO_V, embed_dim=7, hidden_size=9, num_tags=5),
    "seq2seq-attention": dict(src_vocab_size=ZOO_V, tgt_vocab_size=ZOO_TGT_V, embed_dim=7, hidden_size=9,
                              attention_size=5, max_decode_len=6),
}

requires_native = pytest.mark.skipif(
    not seqfuse.ops.has_native_kernel("lstm_layer", "cpu"),
    reason="seqfuse._C was not built with CPU kernels (run `make install`)")

# The backends the op tests take as a parameter, and the device each runs on there: the
# compiled kernels on the CPU (tests/cuda has their CUDA twins), Triton on the GPU when
# there is one, else on CPU tensors under the interpreter.
BACKEND_DEVICE = {"native": "cpu", "reference": "cpu",
                  "triton": "cuda" if torch.cuda.is_available() else "cpu"}


def backend_unavailable(backend: str, op: str = "lstm_layer") -> str | None:
    """Why `backend` cannot run `op` here, or None."""
    device = BACKEND_DEVICE[backend]
    if backend == "native" and not seqfuse.ops.has_native_kernel(op, device):
        return (f"seqfuse._C was not built with a {device} kernel for {op} (run `make install`): "
                + seqfuse.ops.build_hint(device))
    if backend == "triton":
        return seqfuse.backend.triton_unavailable_reason(device)
    return None


def backend_params(*backends: str, op: str = "lstm_layer", cases=None, case_id=None) -> list:
    """pytest.params of `backends`, for @pytest.mark.parametrize("backend", ...) or, with
    `cases` (a list, or a dict from backend to its own list; a tuple entry spreads over
    several arguments), for ("backend,a,b", ...). A backend that cannot run `op` here
    skips with the reason. case_id(case) -> str names a case (default: its values)."""
    params = []
    for b in backends:
        reason = backend_unavailable(b, op)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if cases is None:
            params.append(pytest.param(b, id=b, marks=marks))
            continue
        for case in (cases[b] if isinstance(cases, dict) else cases):
            case_marks = []
            if isinstance(case, _ParameterSet):  # a pytest.param: its values and marks
                case, case_marks = case.values if len(case.values) > 1 else case.values[0], case.marks
            values = case if isinstance(case, tuple) else (case,)
            name = case_id(case) if case_id else "-".join(map(_case_id, values))
            params.append(pytest.param(b, *values, id=f"{b}-{name}", marks=[*marks, *case_marks]))
    return params


_ParameterSet = type(pytest.param(None))


def _case_id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (tuple, list)):
        return "x".join(map(str, value))
    return str(value)


@pytest.fixture
def device(backend):
    """The device `backend` runs on here (BACKEND_DEVICE)."""
    return BACKEND_DEVICE[backend]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
