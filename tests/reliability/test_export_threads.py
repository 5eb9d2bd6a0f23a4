"""Concurrency of an exported model: one onnxruntime session on an artifact of
seqfuse.export.export_model, called from several Python threads at once, gives the same
answers as serially, bit for bit (threads_common.py).
"""
from .threads_common import run_threaded

ORT = """
    import numpy as np, tempfile, pathlib
    import onnxruntime as ort
    from seqfuse.zoo.models import MODELS
    from seqfuse.export import export_model
    torch.manual_seed(0)
    model = MODELS["bigru-classifier"](vocab_size=40, embed_dim=8, hidden_size=10, num_classes=3).eval()
    out = pathlib.Path(tempfile.mkdtemp()) / "art"
    export_model(model, None, out, formats=("onnx",))
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    calls = []
    for B, T in [(1, 3), (5, 19), (12, 50)]:
        g = torch.Generator().manual_seed(B * T)
        ids = torch.randint(1, 40, (B, T), generator=g)
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        feeds = {"input_ids": ids.numpy(), "lengths": lengths.numpy()}
        calls.append(lambda feeds=feeds: tuple(torch.from_numpy(o) for o in sess.run(None, feeds)))
    check("onnxruntime session", calls)
"""


def test_onnxruntime_session_from_threads_equals_serial():
    assert "onnxruntime session" in run_threaded(ORT)
