"""Peak extra memory of one forward (and one forward + backward) of additive attention,
classic unfused module vs seqfuse's fused op, at the self-attention shape of the
benchmarks (B=32, Q=K=256, A=128, Dv=256).

Each measurement runs in a fresh process: inputs and module are built, then the peak
resident set size (ru_maxrss) is read before and after the call; the difference is the
memory the call needed beyond its inputs (large tensors are mmap'd and returned to the
system when freed, so the peak is what the call held at its worst moment).

    python bench/memory.py            # table
    python bench/memory.py --markdown
"""
import json
import subprocess
import sys

CASES = [(impl, mode) for mode in ("forward", "forward+backward") for impl in ("eager", "seqfuse")]

CHILD = r"""
import json, resource, sys, torch
from seqfuse.nn import AdditiveAttention
torch.set_num_threads(2)
impl, mode = sys.argv[1], sys.argv[2]
B, Q, K, A, Dv = 32, 256, 256, 128, 256
torch.manual_seed(0)
m = AdditiveAttention(Dv, Dv, A, backend="reference" if impl == "eager" else "native")
q, k = torch.randn(B, Q, Dv, requires_grad=mode != "forward"), torch.randn(B, K, Dv)
# touch the code paths once at a tiny size, so lazy initialisation is not counted
m(q[:1, :2], k[:1, :2], k[:1, :2]).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "forward":
    with torch.no_grad():
        out = m(q, k, k)
else:
    m(q, k, k).sum().backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_extra_mib": (after - before) / 1024}))
"""


def measure(impl: str, mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, impl, mode], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_extra_mib"]


def main(markdown: bool) -> None:
    results = {case: measure(*case) for case in CASES}
    if markdown:
        print("| additive attention B32 Q256 K256 A128 Dv256 | eager MiB | seqfuse MiB | seqfuse / eager |")
        print("|---|---|---|---|")
    for mode in ("forward", "forward+backward"):
        e, s = results[("eager", mode)], results[("seqfuse", mode)]
        if markdown:
            print(f"| {mode} | {e:.0f} | {s:.0f} | {s / e:.3f} |")
        else:
            print(f"{mode:<17} eager {e:8.0f} MiB   seqfuse {s:8.0f} MiB   ratio {s / e:.3f}")


if __name__ == "__main__":
    main("--markdown" in sys.argv)
