"""Concurrency of the ops: the kernels' sources declare no mutable static or
namespace-scope variables, state that concurrent calls would share (the threaded calls
themselves: test_modules_threads.py), and the scanner that checks it finds planted ones.
"""
import re
import textwrap
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"


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
