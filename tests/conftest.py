import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter, which
# is chosen when triton is first imported: set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import seqfuse  # noqa: F401

# Per-dtype tolerances against eager PyTorch (outputs: absolute; gradients: relative).
TOL = {
    torch.float32: {"out_atol": 1e-5, "grad_rtol": 1e-4, "grad_atol": 1e-5},
    torch.float64: {"out_atol": 1e-10, "grad_rtol": 1e-8, "grad_atol": 1e-10},
}

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
