"""A model trained on the GPU kernels exports unchanged (standard ONNX ops) and passes
parity; onnxruntime's CUDA provider (onnxruntime-gpu, the optional `gpu` extra) serves it.
Runs only on a machine with a CUDA GPU."""
import numpy as np
import pytest
import torch

import seqfuse
from seqfuse.export import export_model
from seqfuse.zoo.models import LSTMClassifier

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_trained_on_gpu_exports_with_parity(tmp_path, backend):
    if backend == "native" and not seqfuse.ops.has_native_kernel("lstm_layer", "cuda"):
        pytest.skip(seqfuse.ops.build_hint("cuda"))
    if backend == "triton" and seqfuse.backend.triton_unavailable_reason("cuda"):
        pytest.skip(seqfuse.backend.triton_unavailable_reason("cuda"))
    torch.manual_seed(0)
    model = LSTMClassifier(50, 12, 32, 3, num_layers=2, bidirectional=True).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.randint(1, 50, (16, 9), device="cuda")
    labels = ids[:, 0] % 3  # learnable from the first token
    lengths = torch.randint(1, 10, (16,))
    before = None
    with seqfuse.use_backend(backend):
        for _ in range(30):
            loss = torch.nn.functional.cross_entropy(model(ids, lengths), labels)
            before = loss.item() if before is None else before
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert loss.item() < 0.5 * before, "training on the GPU kernels did not learn"
    gpu_logits = model(ids, lengths).detach().cpu()
    model = model.cpu()
    torch.testing.assert_close(model(ids.cpu(), lengths), gpu_logits, atol=1e-4, rtol=1e-4)
    result = export_model(model, None, tmp_path / "clf", formats=["onnx"])
    assert result.files["model.onnx"].exists()

    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here (pip install seqfuse[gpu] for "
                    "onnxruntime-gpu); the CPU provider was checked by export_model's parity")
    sess = ort.InferenceSession(str(result.files["model.onnx"]), providers=["CUDAExecutionProvider"])
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
    feeds = {sess.get_inputs()[0].name: ids.cpu().numpy(), sess.get_inputs()[1].name: lengths.numpy()}
    got = sess.run(None, feeds)[0]
    np.testing.assert_allclose(got, model(ids.cpu(), lengths).detach().numpy(), atol=1e-4)
