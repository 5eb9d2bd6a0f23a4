"""The CPU capability the kernels run with (seqfuse.cpu_capability(), csrc/cpu/amx.h), and
every capability this machine supports giving results that match the reference: the
bfloat16 layers run their step products on AMX tiles (blocks of 16 rows) where the CPU has
them, and with SEQFUSE_CPU_CAPABILITY=avx512_bf16 on the AVX512-BF16 register tiles; both
stay within twice eager PyTorch's own bfloat16 error against a float64 reference."""
import json
import os
import subprocess
import sys

import pytest
from conftest import requires_native

import seqfuse

pytestmark = requires_native

CAPABILITIES = ("amx", "avx512_bf16", "avx512", "avx2", "default")

# Runs in a child process: the capability is decided once per process.
_PROBE = r"""
import json, torch, seqfuse
from seqfuse import ops, reference
torch.manual_seed(0)
def err(a, b): return (a.double() - b.double()).abs().max().item()
rows = []
for (kind, G), B in [(k, b) for k in (("lstm", 4), ("gru", 3), ("rnn", 1)) for b in (3, 37)]:
    T, I, H, D = 6, 20, 33, 2   # B 3: one short block; 37: two 16-row blocks and 5 rows; odd H
    x = torch.randn(T, B, I); wi = torch.randn(D, G * H, I) * H ** -0.5
    wh = torch.randn(D, G * H, H) * H ** -0.5; b = torch.randn(D, G * H) * 0.1
    hx = torch.randn(D, B, H); cx = torch.randn(D, B, H)
    L = torch.randint(1, T + 1, (B,)); L[0] = 1
    args = {"lstm": (x, wi, wh, b, hx, cx), "gru": (x, wi, wh, b, b, hx), "rnn": (x, wi, wh, b, hx)}[kind]
    op, ref = getattr(ops, kind + "_layer"), getattr(reference, kind + "_layer")
    exact = ref(*(t.double() for t in args), L)
    with torch.no_grad():
        got = op(*(t.bfloat16() for t in args), L)
        eager = ref(*(t.bfloat16() for t in args), L)
    rows.append([f"{kind} B={B}", [err(g, e) for g, e in zip(got, exact)], [err(g, e) for g, e in zip(eager, exact)],
                 [g.abs().max().item() for g in exact]])
print(json.dumps({"capability": seqfuse.cpu_capability(), "rows": rows}))
"""


def _probe(capability=None):
    env = dict(os.environ)
    env.pop("SEQFUSE_CPU_CAPABILITY", None)
    if capability:
        env["SEQFUSE_CPU_CAPABILITY"] = capability
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_cpu_capability_is_reported():
    assert seqfuse.cpu_capability() in CAPABILITIES


def _supported():
    native = _probe()["capability"]
    caps = [native]
    if native == "amx":
        caps.append("avx512_bf16")
    return caps


@pytest.mark.parametrize("forced", [None, "avx512_bf16"], ids=["detected", "forced-avx512_bf16"])
def test_every_supported_capability_matches_the_reference(forced):
    result = _probe(forced)
    if forced == "avx512_bf16":
        if "amx" not in _supported() and result["capability"] != "avx512_bf16":
            pytest.skip(f"this CPU/build runs {result['capability']}, not avx512_bf16")
        assert result["capability"] == "avx512_bf16"  # the AMX tiles are off
    for kind, ours, eager, scale in result["rows"]:
        for i, (e, e_eager, s) in enumerate(zip(ours, eager, scale)):
            assert e <= 2 * max(e_eager, s * 2 ** -9), f"{kind} output {i}: {e:.2e} vs eager {e_eager:.2e}"


def test_amx_runs_where_the_cpu_has_it():
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    if "amx_bf16" not in flags or seqfuse.ops.has_native_kernel("lstm_layer", "cpu") is False:
        pytest.skip("this CPU has no AMX-BF16: the AMX kernels can only run on one that has")
    cap = _probe()["capability"]
    if cap == "avx512":
        pytest.skip("this build has no AVX512-BF16 (the AMX kernels need it)")
    assert cap == "amx"
