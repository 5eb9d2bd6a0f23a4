"""Builds seqfuse and its compiled ops, seqfuse._C.

`python setup.py develop` (or `pip install --no-build-isolation -e .`) compiles csrc/
against the torch already installed; torch is not a build requirement on purpose, so
that pip never builds against a different torch than the one used at run time.

Environment:
  SEQFUSE_CUDA=0/1   force the CPU-only or the CUDA build (default: CUDA when
                     torch.version.cuda is set and nvcc is found)
  SEQFUSE_CPU_CAPABILITY=AVX512|AVX2|DEFAULT   vector ISA of the CPU kernels (default:
                     the best this machine supports)
  SEQFUSE_BF16=0/1   bfloat16 tiles (AVX512-BF16 vdpbf16ps) for bfloat16 layers (default:
                     when the CPU has avx512_bf16 and the capability is AVX512; without
                     them bfloat16 layers run in float32 and round their results)
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def cpu_capability() -> str:
    forced = os.environ.get("SEQFUSE_CPU_CAPABILITY")
    if forced:
        return forced.upper()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return "DEFAULT"
    if all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq")):
        return "AVX512"
    if "avx2" in flags and "fma" in flags:
        return "AVX2"
    return "DEFAULT"


ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
    "DEFAULT": [],
}


def want_bf16(cap: str) -> bool:
    forced = os.environ.get("SEQFUSE_BF16")
    if forced is not None:
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            return cap == "AVX512" and "avx512_bf16" in f.read()
    except OSError:
        return False


def want_cuda() -> bool:
    forced = os.environ.get("SEQFUSE_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    cap = cpu_capability()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is inlined from ATen's headers as `#pragma omp parallel`;
    # compiled without it, every "parallel" loop in this extension runs on one thread.
    # The extension then shares torch's own libgomp (same soname, already loaded).
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp"] + ISA_FLAGS[cap]
    # ATen's vector headers select their ISA from these macros (as ATen's own kernels do).
    # C++ only: nvcc's host pass gets no ISA flags, so the CUDA sources must not see them.
    cxx.append(f"-DCPU_CAPABILITY={cap}")
    if cap != "DEFAULT":
        cxx.append(f"-DCPU_CAPABILITY_{cap}")
    if want_bf16(cap):
        cxx += ["-mavx512bf16", "-DSEQFUSE_AVX512_BF16"]
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        return cpp_extension.CUDAExtension(
            "seqfuse._C", sources, define_macros=[("SEQFUSE_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
            py_limited_api=False)
    return cpp_extension.CppExtension(
        "seqfuse._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


def packages() -> tuple[list[str], dict[str, str]]:
    """Every package under py_src/ (seqfuse and its subpackages), found rather than listed,
    plus the export stage, whose sources live in export/ at the top level and install as
    seqfuse.export."""
    found = find_packages("py_src")
    found += ["seqfuse.export"] + ["seqfuse.export." + p for p in find_packages("export")]
    return found, {"": "py_src", "seqfuse.export": "export"}


# Metadata (name, version, dependencies, extras, entry points) is in pyproject.toml.
PACKAGES, PACKAGE_DIR = packages()
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
