"""The demo's model at batch 1, as `make demo` times it (issue 22): lstm-classifier
(BiLSTM 128, embedding 64, vocabulary 20000, random weights) at T = 16, 32 and 64 tokens,
2 threads, medians of 2000 calls: seqfuse eager as it runs by default (the embedding folded
into the first layer's input projection, the weight cache), the same with the folding off
(fold_budget_bytes = 0), the model's AOTInductor package (compiled C++ calling the fused
ops, seqfuse predict --runtime aoti) and onnxruntime on its float32 ONNX export, each timed
in its own block (onnxruntime last: its pool keeps spinning after its calls).

    .venv/bin/python bench/percall_model.py
"""
import sys, time, tempfile, warnings, torch, seqfuse
from pathlib import Path
from seqfuse.zoo.models import MODELS
from seqfuse.export import export_model
torch.set_num_threads(2)
torch.manual_seed(0)
model = MODELS["lstm-classifier"](vocab_size=20000, embed_dim=64, hidden_size=128, num_classes=2, bidirectional=True).eval()
res = export_model(model, None, Path(tempfile.mkdtemp()) / "a", model_name="lstm-classifier",
                   formats=("onnx", "aoti"))
from seqfuse.export.runtime import AotiGraph
aoti = AotiGraph(res.files["model.aoti.pt2"])
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
        folded = med(lambda: model(ids, lengths))
        assert "_fold_cache" in model.lstm.__dict__
        model.lstm.fold_budget_bytes = 0
        unfolded = med(lambda: model(ids, lengths))
        model.lstm.fold_budget_bytes = type(model.lstm).fold_budget_bytes
    a = med(lambda: aoti(ids, lengths))
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(res.files["model.onnx"]), opts, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "lengths": lengths.numpy()}
    o = med(lambda: sess.run(None, feeds))
    del sess
    print(f"T={T}: seqfuse eager {folded:.3f} ms (folding off: {unfolded:.3f}), AOTInductor "
          f"{a:.3f} ms, onnxruntime {o:.3f} ms; ratios to onnxruntime: eager {folded / o:.2f}, "
          f"AOTInductor {a / o:.2f}")
