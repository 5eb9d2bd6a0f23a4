"""Triton implementations of seqfuse's ops (backend="triton").

Each op is registered with `torch.library.triton_op` as `seqfuse::<op>_triton` and
launches its kernels through `wrap_triton`, so torch.compile and torch.export trace
into them. The public functions here take the same arguments and return the same
results as their namesakes in `seqfuse.ops`. Kernel, launcher, op and autograd live
together per feature: recurrent.py (LSTM/GRU/RNN layers), attention.py (masked additive
attention and masked SDPA).

Without a GPU they run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
which must be set before triton is first imported): slow, but exact enough to test.
"""
from .attention import additive_attention, scaled_dot_product_attention
from .recurrent import gru_layer, lstm_layer, rnn_layer

__all__ = ["lstm_layer", "gru_layer", "rnn_layer", "additive_attention",
           "scaled_dot_product_attention"]
