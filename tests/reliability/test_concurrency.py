"""Concurrency: seqfuse modules, the fused ops and onnxruntime sessions on exported models,
called from several Python threads at once, give exactly the answers they give serially.

Each test computes every input's answer serially first, then runs the same calls from
THREADS threads at once (several rounds, inputs interleaved so that different shapes run
together) and compares bit for bit: the kernels keep no state between calls (no static
or global mutable variables in csrc/: test_no_global_mutable_state_in_csrc), and each
call's thread team and scratch memory are its own. The threaded part runs in a
subprocess with a time limit, so a deadlock (two calls' thread teams waiting on each
other) fails one test instead of hanging the suite.
"""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import requires_native

CSRC = Path(__file__).resolve().parents[2] / "csrc"
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


RECURRENT = """
    torch.manual_seed(0)
    modules = {
        "lstm": seqfuse.nn.LSTM(7, 9, num_layers=2, bidirectional=True, batch_first=True, backend="native"),
        "gru": seqfuse.nn.GRU(7, 9, bidirectional=True, batch_first=True, backend="native"),
        "rnn": seqfuse.nn.RNN(7, 9, batch_first=True, backend="native"),
    }
    calls = []
    for kind, m in modules.items():
        for B, T in [(1, 5), (3, 17), (8, 40), (5, 1)]:
            g = torch.Generator().manual_seed(B * 100 + T)
            x = torch.randn(B, T, 7, generator=g)
            lengths = torch.randint(1, T + 1, (B,), generator=g)
            lengths[0] = T
            calls.append(lambda m=m, x=x, lengths=lengths: (m(x, lengths=lengths)[0],))
            # training: gradients w.r.t. input and weights, without accumulating into .grad
            def grads(m=m, x=x, lengths=lengths):
                xr = x.clone().requires_grad_()
                y = m(xr, lengths=lengths)[0]
                return torch.autograd.grad(y.square().sum(), [xr, *m.parameters()])
            calls.append(grads)
    check("recurrent", calls)
"""

ATTENTION = """
    torch.manual_seed(0)
    add = seqfuse.nn.AdditiveAttention(6, 5, 4, backend="native")
    mha = seqfuse.nn.MultiheadAttention(8, 2, batch_first=True, backend="native")
    calls = []
    for B, Q, K in [(1, 1, 3), (4, 7, 9), (2, 33, 65)]:
        g = torch.Generator().manual_seed(Q * 10 + K)
        q, k, v = torch.randn(B, Q, 5, generator=g), torch.randn(B, K, 6, generator=g), torch.randn(B, K, 3, generator=g)
        lens = torch.randint(0, K + 1, (B,), generator=g)      # 0: a fully masked row
        calls.append(lambda q=q, k=k, v=v, lens=lens: (add(q, k, v, lens),))
        x = torch.randn(B, K, 8, generator=g)
        pad = torch.arange(K)[None] >= torch.randint(1, K + 1, (B,), generator=g)[:, None]
        calls.append(lambda x=x, pad=pad: (mha(x, x, x, key_padding_mask=pad, need_weights=False)[0],))
        def grads(q=q, k=k, v=v, lens=lens):
            qr = q.clone().requires_grad_()
            return torch.autograd.grad(add(qr, k, v, lens).sum(), [qr, *add.parameters()])
        calls.append(grads)
    check("attention", calls)
"""

ZOO = """
    from seqfuse.zoo.models import MODELS
    torch.manual_seed(0)
    model = MODELS["bilstm-attention"](vocab_size=50, embed_dim=8, hidden_size=12, num_classes=3,
                                       attention_size=6).eval()
    calls = []
    for B, T in [(1, 4), (6, 23), (16, 64)]:
        g = torch.Generator().manual_seed(B + T)
        ids = torch.randint(1, 50, (B, T), generator=g)
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        def run(ids=ids, lengths=lengths):
            with torch.inference_mode():
                out = model(ids, lengths)
            return out if isinstance(out, tuple) else (out,)
        calls.append(run)
    check("zoo bilstm-attention", calls)
"""

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


@requires_native
@pytest.mark.parametrize("torch_threads", [1, 2])
@pytest.mark.parametrize("body", [RECURRENT, ATTENTION, ZOO], ids=["recurrent", "attention", "zoo"])
def test_modules_from_threads_equal_serial(body, torch_threads):
    out = run_threaded(body, torch_threads)
    assert "concurrent calls equal to serial" in out


def test_onnxruntime_session_from_threads_equals_serial():
    assert "onnxruntime session" in run_threaded(ORT)


# Namespace-scope variables, or `static` locals, that are not const/constexpr: state that
# would be shared by concurrent calls.
_MUTABLE_STATIC = re.compile(r"^\s*static\s+(?!const\b|constexpr\b|inline\b|void\b|__device__|__host__|"
                             r"__forceinline__|__global__)[\w:<>,\s*&]+\s+\w+\s*(=|;|\{|\[)")


def _code_lines(path: Path):
    text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
    for n, line in enumerate(text.splitlines(), 1):
        yield n, line.split("//")[0]


def mutable_state(paths) -> list[str]:
    """Mutable static variables (function-local or not) and variables defined at namespace
    scope, in C++/CUDA sources."""
    offenders = []
    for path in paths:
        depth = 0   # braces other than namespaces' (function and class bodies)
        for n, line in _code_lines(path):
            stripped = line.strip()
            if _MUTABLE_STATIC.match(line) and "(" not in stripped.split("=")[0]:
                offenders.append(f"{path.name}:{n}: {stripped}")
            elif depth == 0 and re.match(r"^(?!namespace|template|struct|class|using|typedef|enum|#|extern|"
                                         r"TORCH_|static_assert|inline|constexpr|const\b|return)[A-Za-z_][\w:<>,\s*&]*"
                                         r"\s+[A-Za-z_]\w*(\[\w*\])?\s*(=[^=]|;|\{)", stripped):
                offenders.append(f"{path.name}:{n}: {stripped}")
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
        void g() {
          static int once = 0;
          int local = 1;
          static constexpr int k = 2;
        }
        }  // namespace seqfuse
    """))
    found = mutable_state([src])
    assert [f.split(": ", 1)[1] for f in found] == [
        "int64_t calls = 0;", "static std::vector<float> scratch;", "float table[64];", "static int once = 0;"]
