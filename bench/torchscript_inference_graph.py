"""TorchScript artifacts as inference graphs (issue 23, 2e72a27): the zoo's dense models traced
as seqfuse.export traces them (parameters frozen: the layer ops keep no activations) against
a plain torch.jit.trace of the same module (parameters require grad: activations kept),
batch 1, 2 threads, medians of 2000 calls, each in its own block, twice.

    .venv/bin/python bench/torchscript_inference_graph.py
"""
import time, torch, tempfile, warnings
from pathlib import Path
warnings.simplefilter("ignore")
from seqfuse.zoo.models import MODELS
from seqfuse.export.exporter import export_torchscript
torch.set_num_threads(2); torch.manual_seed(0)
def med(f, n=2000):
    for _ in range(200): f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    ts.sort(); return ts[n // 2] * 1e6
cases = {"lstm-regressor (B1 T30)": (MODELS["lstm-regressor"]().eval(), (torch.randn(1, 30, 5),)),
         "lstm-rows (B1 T28)": (MODELS["lstm-rows"]().eval(), (torch.randn(1, 28, 28),))}
for name, (m, ex) in cases.items():
    d = Path(tempfile.mkdtemp())
    kept = torch.jit.trace(m, ex, check_trace=False)   # params require grad: keeps activations
    export_torchscript(m, ex, d / "m.ts"); frozen = torch.jit.load(str(d / "m.ts"))
    with torch.inference_mode():
        r = []
        for _ in range(2):
            r.append((med(lambda: kept(*ex)), med(lambda: frozen(*ex))))
    print(name, " | ".join(f"kept {a:.1f} us, inference graph {b:.1f} us" for a, b in r))
