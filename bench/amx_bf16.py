"""bfloat16 recurrent layers on AMX tiles (issue 24): the issue's three layers in inference,
seqfuse float32, seqfuse bfloat16 with the AMX tiles (the default where the CPU has them),
seqfuse bfloat16 on the AVX512-BF16 register tiles (SEQFUSE_CPU_CAPABILITY=avx512_bf16),
and OpenVINO bfloat16 (the float32 ONNX export compiled for CPU with
INFERENCE_PRECISION_HINT bf16). Each implementation runs in its own child process (the
capability is chosen once per process, and OpenVINO's pool spins after its calls), 2
threads, medians of `--rounds` calls after warm-up. Prints a markdown table, with the
GFLOP/s seqfuse achieves beside torch's GEMM ceiling measured in the same run.

    .venv/bin/python bench/amx_bf16.py [--rounds 10]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

LAYERS = [  # (name, family, B, T, H, bidirectional)
    ("BiLSTM B64 T256 H256", "LSTM", 64, 256, 256, True),
    ("BiGRU B32 T128 H128", "GRU", 32, 128, 128, True),
    ("LSTM B8 T64 H256", "LSTM", 8, 64, 256, False),
]
IMPLS = ["seqfuse-fp32", "seqfuse-bf16-amx", "seqfuse-bf16-avx512bf16", "openvino-bf16"]

_CHILD = r"""
import json, statistics, sys, tempfile, time
import torch
torch.set_num_threads(2)
import seqfuse
from seqfuse.nn import convert
impl, family, B, T, H, bi, rounds = json.loads(sys.argv[1])
torch.manual_seed(0)
eager = getattr(torch.nn, family)(H, H, bidirectional=bi).eval()
x = torch.randn(T, B, H)
if impl.startswith("openvino"):
    import openvino as ov
    path = tempfile.mkdtemp() + "/layer.onnx"
    class Out(torch.nn.Module):
        def __init__(s, m): super().__init__(); s.m = m
        def forward(s, x): return s.m(x)[0]
    torch.onnx.export(Out(eager), (x,), path, dynamo=False, input_names=["x"], output_names=["y"])
    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY",
                                   "INFERENCE_NUM_THREADS": 2})
    req = compiled.create_infer_request()
    xn = x.numpy()
    fn = lambda: req.infer({"x": xn})
else:
    model = convert(eager)
    inp = x
    if "bf16" in impl:
        model, inp = model.bfloat16(), x.bfloat16()
    def fn():
        with torch.inference_mode():
            return model(inp)
for _ in range(2):
    fn()
times = []
for _ in range(rounds):
    t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
print(json.dumps({"ms": statistics.median(times) * 1e3, "capability": seqfuse.cpu_capability()}))
"""


# The GEMM ceiling of this run: torch's own float32 and bfloat16 GEMMs (MKL / oneDNN, AMX
# where the CPU has it) on square 2048 matrices, 2 threads, in a child of their own.
_CEILING = r"""
import json, statistics, time, torch
torch.set_num_threads(2)
out = {}
for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    a, b = torch.randn(2048, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(10):
        t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
    out[name] = 2 * 2048 ** 3 / statistics.median(ts) / 1e9
print(json.dumps(out))
"""


def gemm_ceiling() -> dict:
    out = subprocess.run([sys.executable, "-c", _CEILING], capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def layer_flops(layer) -> float:
    """Multiply-adds of a layer's forward, times 2: every step multiplies [x_t, h] (I + H
    = 2H here) by the gates' weights of each direction."""
    _, family, B, T, H, bi = layer
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[family]
    return 2.0 * T * B * (2 if bi else 1) * gates * H * (H + H)


def run(impl: str, layer, rounds: int) -> dict:
    _, family, B, T, H, bi = layer
    env = dict(os.environ)
    env.pop("SEQFUSE_CPU_CAPABILITY", None)
    if impl == "seqfuse-bf16-avx512bf16":
        env["SEQFUSE_CPU_CAPABILITY"] = "avx512_bf16"
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([impl, family, B, T, H, bi, rounds])],
                         env=env, capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        return {"ms": float("nan"), "error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def gf(layer, ms: float, ceiling: float) -> str:
    achieved = layer_flops(layer) / (ms * 1e-3) / 1e9
    return f"{achieved:.0f} ({100 * achieved / ceiling:.0f}%)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    model_no = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model\t")), "?")
    ceiling = gemm_ceiling()
    print(f"CPU: {cpu} (model {model_no}), 2 threads, medians of {args.rounds} calls, ms\n")
    print(f"GEMM ceiling of this run (torch, 2048^3, 2 threads): fp32 {ceiling['fp32']:.0f} GFLOP/s, "
          f"bf16 {ceiling['bf16']:.0f} GFLOP/s\n")
    print("| layer | " + " | ".join(IMPLS) + " | bf16-amx vs openvino | bf16-amx vs fp32 | GFLOP/s fp32, bf16 (of the ceiling) |")
    print("|---" * (len(IMPLS) + 4) + "|")
    for layer in LAYERS:
        res = {impl: run(impl, layer, args.rounds) for impl in IMPLS}
        ms = {k: v["ms"] for k, v in res.items()}
        cells = [f"{ms[i]:.2f}" + (f" ({res[i]['capability']})" if "capability" in res[i] and i.startswith("seqfuse-bf16") else "")
                 for i in IMPLS]
        print(f"| {layer[0]} | " + " | ".join(cells)
              + f" | {ms['openvino-bf16'] / ms['seqfuse-bf16-amx']:.2f}x | {ms['seqfuse-fp32'] / ms['seqfuse-bf16-amx']:.2f}x"
              + f" | {gf(layer, ms['seqfuse-fp32'], ceiling['fp32'])}, {gf(layer, ms['seqfuse-bf16-amx'], ceiling['bf16'])} |")
        for impl, r in res.items():
            if "error" in r:
                print(f"  {impl}: {r['error']}", file=sys.stderr)


if __name__ == "__main__":
    main()
