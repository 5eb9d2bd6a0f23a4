"""Builds seqfuse and its compiled ops, seqfuse._C.

`python setup.py develop` (or `pip install --no-build-isolation -e .`) compiles csrc/
against the torch already installed; torch is not a build requirement on purpose, so
that pip never builds against a different torch than the one used at run time.

Environment:
  SEQFUSE_CUDA=0/1   force the CPU-only or the CUDA build (default: CUDA when
                     torch.version.cuda is set and nvcc is found)
  SEQFUSE_CPU_CAPABILITIES=DEFAULT,AVX2,AVX512,AVX512_BF16   the capabilities (vector ISAs)
                     the CPU kernels are compiled for (default: all four on x86-64,
                     DEFAULT elsewhere). Whatever the build machine, the library runs on
                     any CPU; the kernels choose at run time (csrc/cpu/kernels.h).
"""
import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


# csrc/cpu/kernels/ is compiled once per capability, with these flags on top of the rest;
# everything else is compiled for the baseline x86-64 (csrc/cpu/kernels.h).
KERNEL_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY_AVX512"],
    "AVX512_BF16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                    "-mavx512bf16", "-mavx512vnni", "-DCPU_CAPABILITY_AVX512", "-DSEQFUSE_AVX512_BF16"],
}


def kernel_capabilities() -> list[str]:
    """The capabilities to compile, lowest first: the link keeps them in this order (see
    csrc/cpu/kernels.h for why it matters)."""
    forced = os.environ.get("SEQFUSE_CPU_CAPABILITIES")
    if forced:
        caps = [c.strip().upper() for c in forced.split(",") if c.strip()]
        unknown = sorted(set(caps) - set(KERNEL_FLAGS))
        if unknown:
            raise SystemExit(f"SEQFUSE_CPU_CAPABILITIES: unknown {unknown}; use {list(KERNEL_FLAGS)}")
    elif platform.machine().lower() in ("x86_64", "amd64"):
        caps = list(KERNEL_FLAGS)
    else:
        caps = ["DEFAULT"]
    return [c for c in KERNEL_FLAGS if c in caps]


KERNEL_SOURCES = sorted(glob.glob("csrc/cpu/kernels/*.cpp"))


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus the kernel sources compiled once per capability into
    objects linked after the extension's own (csrc/cpu/kernels.h)."""

    def build_extension(self, ext):
        objects = []
        for cap in kernel_capabilities():
            cxx = list(ext.extra_compile_args["cxx"]) + KERNEL_FLAGS[cap] + [f"-DCPU_CAPABILITY={cap}"]
            objects += self.compiler.compile(
                KERNEL_SOURCES, output_dir=os.path.join(self.build_temp, "cpu_" + cap.lower()),
                macros=ext.define_macros, include_dirs=ext.include_dirs, debug=self.debug,
                extra_postargs={"cxx": cxx, "nvcc": []}, depends=ext.depends)
        ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


def want_cuda() -> bool:
    forced = os.environ.get("SEQFUSE_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is inlined from ATen's headers as `#pragma omp parallel`;
    # compiled without it, every "parallel" loop in this extension runs on one thread.
    # The extension then shares torch's own libgomp (same soname, already loaded).
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp"]
    macros = [(f"SEQFUSE_CPU_KERNELS_{cap}", None) for cap in kernel_capabilities()]
    # The kernel sources count as dependencies: any change relinks.
    depends = KERNEL_SOURCES + sorted(glob.glob("csrc/**/*.h", recursive=True))
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        return cpp_extension.CUDAExtension(
            "seqfuse._C", sources, define_macros=macros + [("SEQFUSE_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=["-fopenmp"], depends=depends,
            py_limited_api=False)
    return cpp_extension.CppExtension(
        "seqfuse._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"], depends=depends)


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
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
