"""Serving variants of an exported float32 ONNX model, for onnxruntime on CPU.

    from seqfuse.export.variants import make_variant, latency_ms
    make_variant("int8", "artifacts/my-model/model.onnx", "artifacts/my-model/model.int8.onnx")

  ort-opt  onnxruntime's offline graph optimisation (constant folding, fusions; may use
           com.microsoft contrib ops, so it is for onnxruntime only). Same numbers as
           the float32 model (~1e-6); the optimisations are not redone at every session
           start.
  fp16     float16 weights and activations, float32 inputs/outputs: about half the file.
           onnxruntime's CPU provider has float16 kernels for few ops (LSTM, GRU, MatMul,
           Gemm, Add, Softmax... have none) and wraps the others in Casts to float32 at
           session start, so on CPU this buys size, not speed.
  int8     dynamic quantisation: int8 weights, activations quantised per call (LSTM ->
           com.microsoft DynamicQuantizeLSTM, MatMul -> MatMulInteger, embedding
           tables int8). About a quarter of the weights' bytes; the accuracy cost must be
           measured per model. GRU and RNN nodes stay float32 (onnxruntime has no
           quantised GRU/RNN), so a GRU model barely shrinks.

Why a separate step and not more export formats: a variant is derived from the float32
model.onnx (whose parity with eager PyTorch export_model proves), and its accuracy is
lower by design (fp16, int8), so it is judged by measured bounds and task metrics
rather than by export_model's atol.

Every variant is written to a temporary file in a hidden folder next to `dst`, checked
(one self-contained file that onnxruntime loads, in a subprocess because some
onnxruntime bugs are segfaults) and renamed into place, so a failure leaves `dst` as it
was and nothing else behind.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

VARIANTS = ("ort-opt", "fp16", "int8")

# Ops kept float32 in the fp16 variant (on top of onnxruntime's DEFAULT_OP_BLOCK_LIST).
#
# Found by trying, with onnxruntime 1.31.1 on x86-64 and every op seqfuse's text models
# export (LSTM, GRU, RNN, Softmax, Tanh, MatMul, Gemm, Add, Mul, Div, Where, ReduceMax,
# ReduceSum, Range, Less, Gather, LayerNormalization, Attention, Expand, Transpose...):
# none fails to load by itself, because onnxruntime's InsertCastTransformer runs any
# float16 node without a CPU float16 kernel in float32 between Casts (LSTM, GRU, RNN,
# MatMul, Gemm, Add, Mul, Div, Tanh, Softmax, Where, ReduceMax, ReduceSum, Less: native
# float16 only for Gather, Expand, LayerNormalization, Attention, Transpose, Max...).
# One pattern crashes instead:
#   * Transpose: a float16 Transpose feeding a MatMul (BiLSTM + attention pooling:
#     LSTM output -> Transpose -> MatMul with a weight) becomes Transpose -> Cast -> MatMul,
#     and at the default ORT_ENABLE_ALL the NchwcTransformer dereferences a null pointer
#     on it: a segfault at InferenceSession() (microsoft/onnxruntime#28392, still there in
#     1.31.1). Keeping Transposes float32 avoids the pattern; they move data, so they
#     cost no accuracy.
FP16_BLOCKED_OPS = ("Transpose",)


def make_variant(variant: str, src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write the `variant` of the float32 ONNX model `src` to `dst` (one self-contained
    file) and return dst. Raises ValueError for an unknown variant, FileNotFoundError for
    a missing src, RuntimeError (naming the variant and the cause) if the conversion
    fails or its result does not load in onnxruntime; then dst is left as it was."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"no ONNX model at {src}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    # A hidden work folder next to dst (same filesystem, so the final rename is atomic).
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        out = work / "variant.onnx"
        _WRITERS[variant](src, out, work)
        _check_written(out)
        os.replace(out, dst)
    except Exception as e:
        raise RuntimeError(f"making the {variant!r} variant of {src} failed: "
                           f"{type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dst


def _load_clean(src: Path) -> onnx.ModelProto:
    """src in memory, external data (if any) included, without `graph.value_info`: the
    exporter keeps the example's sizes there (e.g. ['batch', 9, 64]), which contradict
    the shape inference that the fp16 converter and the quantiser run (FIELD_NOTES).
    They are derived data: onnxruntime and the tools infer them again."""
    try:
        model = onnx.load(str(src))
    except Exception as e:
        raise ValueError(f"{src} is not a readable ONNX model ({type(e).__name__}: {e})") from e
    del model.graph.value_info[:]
    return model


def _ort_optimize(src: Path, out: Path, level_name: str) -> None:
    """Let onnxruntime optimise src at `level_name` and write the result to out."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level_name)
    opts.optimized_model_filepath = str(out)  # written while the session is created
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ort.InferenceSession(_load_clean(src).SerializeToString(), opts,
                             providers=["CPUExecutionProvider"])


def _folded(src: Path, work: Path) -> onnx.ModelProto:
    """src with its constant subgraphs folded, in standard ONNX ops only.

    The exporter's constant folding skips tensors above a size limit (8192 elements in
    onnxscript), so a real LSTM's weights stay float32 initializers reordered by
    Slice/Concat at run time; quantize_dynamic only quantises initializer weights (a
    hidden-128 BiLSTM stayed float32: int8 file 0.71x instead of 0.25x of float32).
    onnxruntime's BASIC level folds them; it makes no fusions into contrib ops and
    nothing hardware-specific (the graph-optimisation part of onnxruntime's own
    quant_pre_process, whose symbolic shape inference fails on the attention models)."""
    folded = work / "folded.onnx"
    _ort_optimize(src, folded, "ORT_ENABLE_BASIC")
    model = onnx.load(str(folded))
    del model.graph.value_info[:]
    return model


def _ort_opt(src: Path, out: Path, work: Path) -> None:
    # EXTENDED, not ALL: ALL adds layout transforms (NCHWc blocking and the like) chosen
    # for this machine's CPU (its SIMD width), which would be baked into the file and may
    # not suit, or even run on, the serving machine. EXTENDED's fusions (FusedMatMul,
    # SkipLayerNormalization...) are contrib ops of onnxruntime's CPU provider and do not
    # depend on the CPU.
    _ort_optimize(src, out, "ORT_ENABLE_EXTENDED")


def _fp16(src: Path, out: Path, work: Path) -> None:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(
            _folded(src, work), keep_io_types=True,
            op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP16_BLOCKED_OPS))
    _dedupe_casts(model)
    _topological_sort(model.graph)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


def _dedupe_casts(model: onnx.ModelProto) -> None:
    """convert_float_to_float16 gives a float16 value read by several blocked inputs one
    Cast per reader, all with the same node and output name ("x_cast_to_fp32"): an
    invalid graph (two producers of one value). They are identical: keep the first."""
    seen: set[bytes] = set()
    keep = []
    for node in model.graph.node:
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            key = node.SerializeToString()
            if key in seen:
                continue
            seen.add(key)
        keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)
    names: set[str] = set()
    infos = []
    for vi in model.graph.value_info:
        if vi.name not in names:
            names.add(vi.name)
            infos.append(vi)
    if len(infos) != len(model.graph.value_info):
        del model.graph.value_info[:]
        model.graph.value_info.extend(infos)


def _topological_sort(graph: onnx.GraphProto) -> None:
    """convert_float_to_float16 appends its Casts at the end of the node list; ONNX wants
    every node after the producers of its inputs (onnxruntime sorts by itself, the
    checker and other tools do not). Stable: the nodes otherwise keep their order."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    order: list[int] = []
    state = [0] * len(graph.node)  # 0 new, 1 visiting, 2 placed

    def visit(i: int) -> None:
        stack = [(i, iter(graph.node[i].input))]
        state[i] = 1
        while stack:
            j, inputs = stack[-1]
            for name in inputs:
                k = producer.get(name)
                if k is not None and state[k] == 0:
                    state[k] = 1
                    stack.append((k, iter(graph.node[k].input)))
                    break
                if k is not None and state[k] == 1:
                    raise RuntimeError(f"the graph has a cycle through {name!r}")
            else:
                stack.pop()
                state[j] = 2
                order.append(j)

    for i in range(len(graph.node)):
        if state[i] == 0:
            visit(i)
    if order != list(range(len(graph.node))):
        nodes = [graph.node[i] for i in order]
        del graph.node[:]
        graph.node.extend(nodes)


def _int8(src: Path, out: Path, work: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic takes a path (and writes its own temporaries next to it)
    folded = work / "int8-input.onnx"
    onnx.save(_folded(src, work), str(folded))
    root = logging.getLogger()
    root.addFilter(_no_preprocess_advice)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # reduce_range: 7-bit weights. Without VNNI, onnxruntime's u8s8 products
            # (vpmaddubsw) saturate int16 pairs: on an AVX2-only CPU the BiGRU test model's
            # int8 logits were 0.21 off eager with 8-bit weights, 0.028 with 7-bit ones
            # (tests/export/test_variants.py). An artifact may be served on any CPU.
            quantize_dynamic(folded, out, weight_type=QuantType.QInt8, reduce_range=True)
    finally:
        root.removeFilter(_no_preprocess_advice)


def _no_preprocess_advice(record: logging.LogRecord) -> bool:
    # quantize_dynamic logs "Please consider to run pre-processing before quantization"
    # on every call; _folded is that pre-processing's graph optimisation.
    return not str(record.msg).startswith("Please consider to run pre-processing")


# Loads the model in a fresh interpreter: onnxruntime bugs at session creation can be
# segfaults (see FP16_BLOCKED_OPS), which would otherwise kill the caller.
_LOAD_CHECK = """
import sys, onnxruntime as ort
opts = ort.SessionOptions(); opts.log_severity_level = 3
ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
"""


def _check_written(path: Path) -> None:
    """The file is one self-contained ONNX model that loads in onnxruntime on CPU at its
    default optimisation level (ORT_ENABLE_ALL, as a server loads it)."""
    proto = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in proto.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise RuntimeError(f"the written model keeps {len(external)} initializers in an external "
                           f"data file (e.g. {external[0]!r})")
    try:
        done = subprocess.run([sys.executable, "-c", _LOAD_CHECK, str(path)], capture_output=True,
                              text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError("onnxruntime took over 600 s to load the written model") from e
    if done.returncode != 0:
        why = (f"crashed ({_signal_name(-done.returncode)})" if done.returncode < 0 else
               "failed: " + (done.stderr.strip().splitlines() or ["(no message)"])[-1])
        raise RuntimeError("onnxruntime (CPUExecutionProvider) cannot load the written model: "
                           + why)


def _signal_name(number: int) -> str:
    try:
        return f"signal {number}, {signal.Signals(number).name}"
    except ValueError:
        return f"signal {number}"


_WRITERS: dict[str, Callable[[Path, Path, Path], None]] = {
    "ort-opt": _ort_opt, "fp16": _fp16, "int8": _int8}


def latency_ms(run: Callable[[], object], *, warmup: int = 3, min_runs: int = 10,
               min_seconds: float = 0.2) -> dict:
    """Time `run()` (e.g. `lambda: sess.run(None, feeds)`): `warmup` untimed calls, then
    timed calls until there are at least `min_runs` of them and they took at least
    `min_seconds` in all. Returns {"median_ms", "p90_ms", "runs"}."""
    if warmup < 0 or min_runs < 1 or min_seconds < 0:
        raise ValueError(f"need warmup >= 0, min_runs >= 1, min_seconds >= 0; got "
                         f"{warmup}, {min_runs}, {min_seconds}")
    for _ in range(warmup):
        run()
    times: list[float] = []
    total = 0.0
    while len(times) < min_runs or total < min_seconds:
        t0 = time.perf_counter()
        run()
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    ms = np.asarray(times) * 1e3
    return {"median_ms": float(statistics.median(ms)),
            "p90_ms": float(np.percentile(ms, 90)), "runs": len(times)}
