"""The demo's model at batch 1, as `make demo` times it, with and without the recurrent
modules' weight cache (issue 22): lstm-classifier (BiLSTM 128, embedding 64, vocabulary
20000, random weights) at T = 16, 32 and 64 tokens, 2 threads, medians of 2000 calls:
seqfuse eager with the cache, the same build with the cache bypassed, and onnxruntime on
the model's float32 ONNX export, each timed in its own block.

    .venv/bin/python bench/percall_model.py
"""
import sys, time, tempfile, warnings, torch, seqfuse
from pathlib import Path
from seqfuse.zoo.models import MODELS
from seqfuse.export import export_model
import seqfuse.nn.rnn as rnn
torch.set_num_threads(2)
torch.manual_seed(0)
model = MODELS["lstm-classifier"](vocab_size=20000, embed_dim=64, hidden_size=128, num_classes=2, bidirectional=True).eval()
res = export_model(model, None, Path(tempfile.mkdtemp()) / "a", model_name="lstm-classifier")
def med(f, n=2000):
    for _ in range(200): f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    ts.sort(); return ts[n // 2] * 1e3
import onnxruntime as ort
for T in (16, 32, 64):
    ids = torch.randint(1, 20000, (1, T)); lengths = torch.tensor([T])
    with torch.inference_mode():
        cached = med(lambda: model(ids, lengths))
        orig = rnn._RecurrentBase._op_weights
        rnn._RecurrentBase._op_weights = rnn._RecurrentBase._stack_weights
        uncached = med(lambda: model(ids, lengths))
        rnn._RecurrentBase._op_weights = orig
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(res.files["model.onnx"]), opts, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "lengths": lengths.numpy()}
    o = med(lambda: sess.run(None, feeds))
    del sess
    print(f"T={T}: seqfuse {cached:.3f} ms (weight cache bypassed: {uncached:.3f}), onnxruntime {o:.3f} ms, ratio seqfuse/ort {cached / o:.2f}")
