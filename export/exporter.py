"""Turn a trained model into a served artifact folder, after proving parity.

    out_dir/
      model.onnx      standard ONNX ops only (LSTM nodes with sequence_lens), one file,
                      dynamic batch and sequence length
      model.ts        TorchScript (needs `import seqfuse`, which registers its ops)
      manifest.json   model config, inputs/outputs, opset, sha256 of every file, parity

Nothing is published unless every format matches the eager model within `atol` at
every parity case: the folder is built in a temporary sibling and renamed into place,
so a failed or interrupted export leaves the previous artifact (if any) untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import seqfuse

from .onnx_ops import OPSET, translations
from .parity import ParityError, ParityReport, parity_cases, run_parity
from .specs import ExportSpec, spec_for

FORMATS = ("onnx", "torchscript")


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, Path]
    parity: ParityReport
    manifest: dict = field(repr=False)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_onnx(model: nn.Module, example: tuple, spec: ExportSpec, path: Path, opset: int = OPSET) -> Path:
    dims = {}
    dynamic_shapes = []
    for axes in spec.dynamic_axes:
        dynamic_shapes.append({
            ax: dims.setdefault(name, torch.export.Dim(name, min=1, max=1 << 16))
            for ax, name in axes.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, example, dynamo=True, opset_version=opset,
            custom_translation_table=translations(opset), input_names=spec.input_names,
            output_names=spec.output_names, dynamic_shapes=tuple(dynamic_shapes),
            optimize=True, verbose=False)
    program.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    # The exporter keeps the example's sizes in value_info (e.g. ['batch', 9, 64]),
    # which breaks later shape inference at other lengths: drop them.
    del proto.graph.value_info[:]
    custom = [n.op_type for n in proto.graph.node if n.domain not in ("", "ai.onnx")]
    if custom:
        raise RuntimeError(f"ONNX export produced non-standard ops {custom}")
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return path


def export_torchscript(model: nn.Module, example: tuple, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path))
    return path


def _runners(files: dict[str, Path], spec: ExportSpec):
    runners = {}
    if "onnx" in files:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(files["onnx"]), opts, providers=["CPUExecutionProvider"])

        def run_onnx(*inputs):
            feeds = {n: t.numpy() for n, t in zip(spec.input_names, inputs)}
            return [torch.from_numpy(np.asarray(o)) for o in sess.run(spec.output_names, feeds)]
        runners["onnx"] = run_onnx
    if "torchscript" in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts = torch.jit.load(str(files["torchscript"]))

        def run_ts(*inputs):
            out = ts(*inputs)
            return list(out) if isinstance(out, (tuple, list)) else [out]
        runners["torchscript"] = run_ts
    return runners


def export_model(model: nn.Module, out_dir: str | os.PathLike, *, spec: ExportSpec | None = None,
                 formats=FORMATS, opset: int = OPSET, atol: float = 1e-5, trace_length: int = 16,
                 extra_cases: list[tuple] | None = None, model_name: str | None = None,
                 extra_files: dict[str, str | os.PathLike] | None = None, seed: int = 0) -> ExportResult:
    """Export `model` to `out_dir` (see the module docstring); raise ParityError, leaving
    nothing behind, if any format differs from eager by more than `atol` anywhere.

    extra_cases: more parity inputs (tuples of tensors), e.g. real held-out examples.
    extra_files: name -> path of files to publish alongside (e.g. the vocabulary).
    """
    formats = tuple(formats)
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"formats must be a subset of {FORMATS}, got unknown {sorted(unknown)}")
    if not atol > 0:
        raise ValueError(f"atol must be > 0, got {atol}")
    spec = spec or spec_for(model)
    model = model.eval()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    example = spec.make_inputs(3, trace_length, gen, True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        files: dict[str, Path] = {}
        t0 = time.perf_counter()
        if "onnx" in formats:
            files["onnx"] = export_onnx(model, example, spec, tmp / "model.onnx", opset)
        if "torchscript" in formats:
            files["torchscript"] = export_torchscript(model, example, tmp / "model.ts")
        export_seconds = time.perf_counter() - t0

        cases = parity_cases(spec, trace_length, gen)
        for i, inputs in enumerate(extra_cases or []):
            cases.append((f"real[{i}] b={inputs[0].shape[0]} t={inputs[0].shape[1]}", inputs))
        report = run_parity(model, _runners(files, spec), cases, spec.output_names, atol,
                            spec.is_classifier)
        if not report.passed:
            raise ParityError(report)

        for name, src in (extra_files or {}).items():
            files[name] = Path(shutil.copy(src, tmp / name))
        manifest = {
            "model": model_name or type(model).__name__,
            "config": getattr(model, "config", {}),
            "inputs": [{"name": n, "dtype": str(t.dtype).replace("torch.", ""),
                        "dims": [spec.dynamic_axes[i].get(a, int(s)) for a, s in enumerate(t.shape)]}
                       for i, (n, t) in enumerate(zip(spec.input_names, example))],
            "outputs": spec.output_names,
            "opset": opset,
            "files": {k: {"path": p.name, "sha256": _sha256(p)} for k, p in files.items()},
            "parity": report.to_dict(),
            "export_seconds": round(export_seconds, 2),
            "notes": {"torchscript": "the TorchScript graph calls seqfuse ops: `import seqfuse` before torch.jit.load"},
            "versions": {"seqfuse": seqfuse.__version__, "torch": torch.__version__,
                         "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                         "python": platform.python_version()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out_dir, {k: out_dir / p.name for k, p in files.items()}, report, manifest)


def _publish(tmp: Path, out_dir: Path) -> None:
    """Swap the finished folder into place; the old one is removed only after."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
