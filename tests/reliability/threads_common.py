"""Shared by the concurrency tests, one file per entry point: test_modules_threads.py (the
seqfuse modules and a zoo model), test_export_threads.py (an onnxruntime session on an
exported model) and test_ops_threads.py (the kernels keep no state between calls).

Each threaded test computes every input's answer serially first, then runs the same calls
from THREADS threads at once (several rounds, inputs interleaved so that different shapes
run together) and compares bit for bit: the kernels keep no state between calls (no static
or global mutable variables in csrc/: test_no_global_mutable_state_in_csrc), and each
call's thread team and scratch memory are its own. The threaded part runs in a
subprocess with a time limit, so a deadlock (two calls' thread teams waiting on each
other) fails one test instead of hanging the suite.
"""
import subprocess
import sys
import textwrap

TIMEOUT_S = 240

PRELUDE = textwrap.dedent("""
    import threading, torch, seqfuse
    from concurrent.futures import ThreadPoolExecutor
    THREADS, ROUNDS = 4, 3

    def check(name, calls):
        # calls: list of zero-argument functions returning a tuple of tensors
        serial = [tuple(t.detach().clone() for t in f()) for f in calls]
        order = [i for _ in range(ROUNDS) for i in range(len(calls))]
        with ThreadPoolExecutor(THREADS) as pool:
            results = list(pool.map(lambda i: (i, calls[i]()), order))
        for i, got in results:
            for a, b in zip(got, serial[i]):
                assert torch.equal(a, b), f"{name}: call {i} differs when run concurrently"
        print(f"{name}: {len(results)} concurrent calls equal to serial")
""")


def run_threaded(body: str, torch_threads: int = 2) -> str:
    code = PRELUDE + f"torch.set_num_threads({torch_threads})\n" + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
