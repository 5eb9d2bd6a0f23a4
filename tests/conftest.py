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

requires_native = pytest.mark.skipif(
    not seqfuse.ops.has_native_kernel("lstm_layer", "cpu"),
    reason="seqfuse._C was not built with CPU kernels (run `make install`)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
