"""Concurrency of the ops: the kernels' sources declare no mutable static or
namespace-scope variables, state that concurrent calls would share (the threaded calls
themselves: test_modules_threads.py), and the scanner that checks it finds planted ones;
another thread writing an op's lengths or valid_lens while it runs cannot crash it; a
forked child of a process whose OpenMP threads ran does not hang in an op.
"""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import requires_native

from .threads_common import run_threaded

CSRC = Path(__file__).resolve().parents[2] / "csrc"


# Namespace-scope variables, or `static` locals, that are not const/constexpr: state that
# would be shared by concurrent calls.
_MUTABLE_STATIC = re.compile(r"^\s*static\s+(?!const\b|constexpr\b|inline\b|void\b|__device__|__host__|"
                             r"__forceinline__|__global__)[\w:<>,\s*&]+\s+\w+\s*(=|;|\{|\[)")


# A variable may be process-wide on purpose (the forked-child flag of fork_safety.cpp):
# its line says so in a comment, and test_no_global_mutable_state_in_csrc lists them all.
PROCESS_WIDE = "// process-wide"


def _code_lines(path: Path, *, with_marked: bool = False):
    text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
    for n, line in enumerate(text.splitlines(), 1):
        if with_marked or PROCESS_WIDE not in line:
            yield n, line.split("//")[0]


def mutable_state(paths, *, with_marked: bool = False) -> list[str]:
    """Mutable static variables (function-local or not) and variables defined at namespace
    scope, in C++/CUDA sources (with_marked: those marked process-wide too)."""
    offenders = []
    for path in paths:
        depth = 0   # braces other than namespaces' (function and class bodies)
        parens = 0  # open parentheses: a line inside them continues a parameter list or a call
        for n, line in _code_lines(path, with_marked=with_marked):
            stripped = line.strip()
            if _MUTABLE_STATIC.match(line) and "(" not in stripped.split("=")[0]:
                offenders.append(f"{path.name}:{n}: {stripped}")
            elif depth == 0 and parens == 0 and re.match(r"^(?!namespace|template|struct|class|using|typedef|enum|#|extern|"
                                         r"TORCH_|static_assert|inline|constexpr|const\b|return)[A-Za-z_][\w:<>,\s*&]*"
                                         r"\s+[A-Za-z_]\w*(\[\w*\])?\s*(=[^=]|;|\{)", stripped):
                offenders.append(f"{path.name}:{n}: {stripped}")
            parens = max(parens + line.count("(") - line.count(")"), 0)
            if stripped.startswith("namespace") and stripped.endswith("{"):
                continue
            depth = max(depth + line.count("{") - line.count("}"), 0)
    return offenders


def test_no_global_mutable_state_in_csrc():
    """The kernels' sources declare no mutable static or namespace-scope variables."""
    sources = [p for p in sorted(CSRC.rglob("*")) if p.suffix in (".cpp", ".h", ".cu", ".cuh")
               and "tests" not in p.parts and p.name != "python_module.cpp"]
    assert len(sources) > 10
    offenders = mutable_state(sources)
    assert not offenders, "mutable global state in csrc/:\n" + "\n".join(offenders)
    # The only state marked process-wide: the CPU kernels' capability (cpu/dispatch.cpp),
    # whether this process is a forked child, and until when the machine is busy (the
    # layers run on one thread: cpu/team_tasks.h).
    marked = [f.split(": ", 1)[1] for f in mutable_state(sources, with_marked=True)]
    assert marked == ["std::atomic<int> g_active{-1};", "std::mutex g_choose;",
                      "static std::atomic<bool> flag{false};", "static BusyMachine memory;"], marked


def test_the_state_scanner_is_not_vacuous(tmp_path):
    src = tmp_path / "k.cpp"
    src.write_text(textwrap.dedent("""
        namespace seqfuse {
        constexpr int kTile = 6;
        int64_t calls = 0;
        static std::vector<float> scratch;
        float table[64];
        static inline float f(float x) { return x; }
        at::Tensor op(const at::Tensor& x,
                      int64_t n);
        void h(const at::Tensor& x,
               bool flag = false) {
          int inner = 0;
        }
        int after = 1;
        void g() {
          static int once = 0;
          int local = 1;
          static constexpr int k = 2;
        }
        }  // namespace seqfuse
    """))
    found = mutable_state([src])
    assert [f.split(": ", 1)[1] for f in found] == [
        "int64_t calls = 0;", "static std::vector<float> scratch;", "float table[64];", "int after = 1;",
        "static int once = 0;"]


# Another thread rewrites the index tensor, with values in and out of range, while the op
# runs over and over: each call returns or refuses with the checks' error. Before the op
# took a private copy (csrc/check_format.h: private_copy), the checks read one value and
# the kernel another, and the process segfaulted.
MUTATE_INDICES = """
    import random
    T, B = 40, 16
    x = torch.randn(T, B, 8)
    lstm = seqfuse.nn.LSTM(8, 16, bidirectional=True, backend="native")
    lengths = torch.full((B,), T, dtype=torch.int64)
    q, k, v = torch.randn(B, 2, 4, 8), torch.randn(B, 2, 64, 8), torch.randn(B, 2, 64, 8)
    valid_lens = torch.full((B,), 64, dtype=torch.int64)
    stop = threading.Event()

    def scribble():
        rng = random.Random(0)
        while not stop.is_set():
            for t, hi in ((lengths, T), (valid_lens, 64)):
                t[rng.randrange(B)] = rng.choice([1, hi, 0, -7, hi + 1, 2**40, -2**62])

    writer = threading.Thread(target=scribble)
    writer.start()
    outcomes = {"ran": 0, "refused": 0}
    try:
        for i in range(300):
            try:
                if i % 2:
                    lstm(x, lengths=lengths)
                else:
                    seqfuse.functional.scaled_dot_product_attention(q, k, v, valid_lens=valid_lens,
                                                                    backend="native")
                outcomes["ran"] += 1
            except (RuntimeError, ValueError) as e:
                assert "length" in str(e) or "valid_lens" in str(e), e
                outcomes["refused"] += 1
    finally:
        stop.set()
        writer.join()
    print("outcomes", outcomes)
    print("concurrent calls equal to serial")  # the marker run_threaded's callers look for
"""


@requires_native
def test_indices_written_by_another_thread_never_crash():
    out = run_threaded(MUTATE_INDICES, torch_threads=2)
    assert "outcomes" in out


# A forked child of a process whose OpenMP threads have run: os.fork (Python's fork hook,
# seqfuse/__init__.py) and a fork from C that bypasses it (pthread_atfork in
# csrc/cpu/fork_safety.cpp). Plain torch hangs in both without seqfuse's handlers.
FORK = """
    import ctypes, os, sys, time, torch, seqfuse
    torch.set_num_threads(2)
    lstm = seqfuse.nn.LSTM(64, 128, batch_first=True, backend="native")
    x = torch.randn(32, 50, 64)
    with torch.inference_mode():
        want = lstm(x)[0]  # the parent's OpenMP team runs
    pid = os.fork() if sys.argv[1] == "os" else ctypes.CDLL(None).fork()
    if pid == 0:
        with torch.inference_mode():
            got = lstm(x)[0]
        os._exit(0 if torch.equal(got, want) else 3)
    t0 = time.time()
    while time.time() - t0 < 60:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            sys.exit(os.waitstatus_to_exitcode(status))
        time.sleep(0.05)
    os.kill(pid, 9)
    sys.exit("the forked child hung")
"""


@requires_native
@pytest.mark.parametrize("how", ["os", "libc"])
def test_forked_child_runs_ops(how):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(FORK), how], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# Busy cores: more op threads than cores (4 on this machine's 2) and a process spinning
# beside them, so the layer's threads lose their cores mid-call and their parts are taken
# over (csrc/cpu/team_tasks.h; the take-over itself is checked in csrc/tests). Whoever runs
# a part, the result is the one of an idle machine, bit for bit, forward and backward, in
# every thread plan: units split (B1 uni), one direction per thread (bi), rows split (B32).
CONTENDED = """
    import subprocess, sys
    cases = []
    for B, T, bi in ((1, 48, False), (1, 24, True), (32, 20, False)):
        torch.manual_seed(0)
        lstm = seqfuse.nn.LSTM(64, 128, bidirectional=bi, backend="native")
        ref = torch.nn.LSTM(64, 128, bidirectional=bi)
        ref.load_state_dict(lstm.state_dict())
        x = torch.randn(T, B, 64, requires_grad=True)
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = T

        def run(lstm=lstm, x=x, lengths=lengths):
            y = lstm(x, lengths=lengths)[0]
            gx, = torch.autograd.grad(y.square().sum(), x)
            return y.detach(), gx

        want = run()  # idle machine, same thread count (ATen's GEMMs sum per thread count)
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        ref_y = torch.nn.utils.rnn.pad_packed_sequence(ref(packed)[0], total_length=T)[0]
        torch.testing.assert_close(want[0], ref_y, atol=1e-5, rtol=0)
        cases.append(((B, T, bi), run, want))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for name, run, want in cases:
            for i in range(150):
                got = run()
                assert all(torch.equal(a, b) for a, b in zip(got, want)), (name, i)
    finally:
        hog.kill()
    print("concurrent calls equal to serial")
"""


@requires_native
def test_busy_cores_give_the_idle_result():
    out = run_threaded(CONTENDED, torch_threads=4)
    assert "concurrent calls equal to serial" in out
