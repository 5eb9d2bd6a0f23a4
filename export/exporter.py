"""Turn a trained model into a served artifact folder, after proving parity.

    out_dir/
      model.onnx        standard ONNX ops only (LSTM/GRU nodes with sequence_lens), one
                        file, dynamic batch and sequence length, constant-folded
      model.ts          TorchScript          } both call seqfuse's ops:
      model.pt2         torch.export program } `import seqfuse` before loading
      model.aoti.pt2    AOTInductor package (--formats ...,aoti): compiled C++ that calls
                        seqfuse's fused ops through the dispatcher; no Python graph
      model.fp16.onnx   variants (--variants): ort-opt, fp16, int8
      vocab.json ...    the vocabularies, for `seqfuse predict`
      manifest.json     model and config, inputs/outputs, opset, sha256 of every file,
                        parity tables, variant metrics and latency, versions

A seq2seq model is two graphs, `encoder.*` and `decoder.*` (one decoding step).

Nothing is published unless every format matches the eager model within `atol` at every
parity case (and, for seq2seq, greedy decoding in onnxruntime reproduces eager decoding
token for token): the folder is built in a temporary sibling and swapped into place in one
step (see _publish), so a failed or interrupted (even killed) export leaves the previous
artifact (if any) untouched; the next export cleans up what a killed one left behind.

The destination is replaced only when it is missing, empty or a previous artifact (only
the files its manifest.json lists), or with force; never when it is, or holds, an input
(seqfuse.atomic.check_destination). Every destination, the Triton model folders too, is
checked before the export starts and again right before the swap.

A model with torch.nn recurrent or attention layers is exported through seqfuse's layers
(seqfuse.nn.convert on a copy): torch.nn's packed sequences do not export, seqfuse's
lengths-aware ops do. Parity is still measured against the original torch.nn model.

A model whose forward calls pack_padded_sequence (then an LSTM/GRU/RNN, then
pad_packed_sequence or h_n) exports as written: ONNX, torch.export and AOTInductor trace
it under seqfuse.nn.packing.symbolic_packing (a PackedSequence is the padded input plus
its lengths; the layers run with lengths=, ONNX `sequence_lens`); TorchScript traces
torch's own packing ops, which run at any shape.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import onnxruntime as ort
import onnxscript.optimizer
import torch
from torch import nn

import seqfuse
from seqfuse.atomic import (DestinationError, check_destination, check_folder, copy_regular_file, make_temp_dir,
                            only_regular_files, open_regular, owned_prefix, recover, rename_exchange,
                            swap_in)
from seqfuse.nn import convert, serving_trace
from seqfuse.nn.packing import symbolic_packing

from .onnx_ops import OPSET, translations
from .parity import ParityError, ParityReport, SequenceCheck, _as_list, compare, parity_cases, run_parity
from .runtime import (AotiGraph, ArtifactError, OrtGraph, OrtModel, _first_line, read_manifest, settings_sha256,
                      sha256_file, verify_artifact)
from .specs import ExportError, ExportPart, ExportPlan, ExportSpec, ExportSpecError, plan_for
from .variants import VARIANTS, latency_ms, make_variant

FORMATS = ("onnx", "torchscript", "pt2", "aoti")
# What an export writes unless asked: AOTInductor compiles C++ (about 20 s a graph here).
DEFAULT_FORMATS = ("onnx", "torchscript", "pt2")
SUFFIX = {"onnx": ".onnx", "torchscript": ".ts", "pt2": ".pt2", "aoti": ".aoti.pt2"}
MIN_OPSET, MAX_OPSET = 18, 23
_FOLD_LIMIT = 1 << 28  # elements: constant-fold weights of any size
# Layers torch.onnx cannot export with lengths (packed sequences), or that seqfuse exports
# as standard ops with masks: exported through seqfuse.nn.convert.
_CONVERTED = (nn.LSTM, nn.GRU, nn.RNN, nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)
# Metrics in [0, 1]: a change of 0.01 is one point. Others (rmse): one point is 1 %.
_UNIT_METRICS = {"accuracy", "macro_f1", "token_accuracy", "vowel_accuracy", "per", "bleu", "word_accuracy"}


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, Path]               # "model.onnx" (file name) -> path, every file published
    parity: ParityReport
    manifest: dict = field(repr=False)
    triton_models: list[Path] = field(default_factory=list)


def _quiet() -> None:
    # torch.onnx logs one warning per missing torchvision op and its progress banners.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)


def _clear_rnn_dispatch_cache() -> None:
    # FIELD_NOTES: a second export of a model with aten.lstm/gru and a dynamic length in
    # one process can fail ("tracing inferred a static shape") unless this cache is empty.
    for overload in (torch.ops.aten.lstm.input, torch.ops.aten.gru.input, torch.ops.aten.rnn_tanh.input):
        cache = getattr(overload, "_dispatch_cache", None)
        if cache is not None:
            cache.clear()


# Why an axis declared dynamic gets fixed, and what to do (export_onnx, export_model).
_SPECIALISED = ("The model's Python depends on that size: a loop over range(x.shape[i]), a "
                "branch on it, or .item()/.tolist() of a tensor derived from it. Write it as "
                "a tensor computation (a loop over time as a seqfuse or torch.nn recurrent "
                "layer), or declare the axis static.")


# Why torch.export stops on a value it cannot know while tracing, and what to do.
_DATA_DEPENDENT = ("The model reads a tensor's values as Python numbers (.tolist(), .item(), int(t), "
                   "a branch on a value), which a graph cannot depend on: e.g. pass pack_padded_sequence "
                   "the lengths tensor (lengths.cpu()), not lengths.tolist().")


def _causes(exc: BaseException) -> list[BaseException]:
    """exc and the exceptions it was raised from (torch.onnx wraps torch.export's)."""
    seen = []
    while exc is not None and exc not in seen and len(seen) < 8:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def export_onnx(module: nn.Module, example: tuple, spec: ExportSpec, path: Path, opset: int = OPSET) -> Path:
    """One self-contained ONNX file of standard ops, dynamic dims, no stale shapes."""
    _quiet()
    _clear_rnn_dispatch_cache()
    with warnings.catch_warnings(), symbolic_packing():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, example, dynamo=True, opset_version=opset,
            custom_translation_table=translations(opset), input_names=spec.input_names,
            output_names=spec.output_names, dynamic_shapes=spec.dynamic_shapes(module),
            optimize=True, verbose=False)
        # The exporter's optimizer folds only tensors of <= 8192 elements: the LSTM/GRU
        # gate reordering of real-sized weights (hidden 128: 65k) would stay Slice/Concat
        # nodes run at every session start, and quantize_dynamic would not see constant
        # LSTM weights. Fold everything that is constant.
        onnxscript.optimizer.optimize(program.model, input_size_limit=_FOLD_LIMIT, output_size_limit=_FOLD_LIMIT)
    program.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    # The exporter keeps the example's sizes in value_info (e.g. ['batch', 9, 64]),
    # which breaks later shape inference at other lengths: drop them.
    del proto.graph.value_info[:]
    custom = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise ExportError(f"ONNX export produced non-standard ops {custom}")
    names = [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]
    if names != (spec.input_names, spec.output_names):
        raise ExportError(f"ONNX graph has inputs/outputs {names}, expected "
                          f"{(spec.input_names, spec.output_names)} (an unused input is dropped by "
                          "the exporter: every input must reach an output)")
    for value, axes in zip(proto.graph.input, spec.dynamic_axes):
        dims = value.type.tensor_type.shape.dim
        for axis, dim_name in axes.items():
            if axis < len(dims) and dims[axis].HasField("dim_value"):
                raise ExportError(f"the exported ONNX graph fixed axis {axis} ('{dim_name}') of input "
                                  f"'{value.name}' to {dims[axis].dim_value}, the example's size, "
                                  f"though dynamic_axes declares it dynamic. {_SPECIALISED}")
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return path


def export_torchscript(module: nn.Module, example: tuple, path: Path) -> Path:
    """An inference graph: traced with the parameters frozen (restored after), so the
    layer ops are recorded without keeping activations (a trace cannot follow the grad
    mode of its later callers; ops.needs_backward)."""
    with warnings.catch_warnings(), _frozen(module):
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path))
    return path


@contextlib.contextmanager
def _frozen(module: nn.Module):
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def export_pt2(module: nn.Module, example: tuple, spec: ExportSpec, path: Path) -> Path:
    with warnings.catch_warnings(), symbolic_packing():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, example, dynamic_shapes=spec.dynamic_shapes(module), strict=False)
        torch.export.save(program, str(path))
    return path


def export_aoti(module: nn.Module, example: tuple, spec: ExportSpec, path: Path) -> Path:
    """torch.export, then AOTInductor: a .pt2 package of compiled C++ with the weights, with
    the same dynamic batch and length. The fused ops stay calls into seqfuse's kernels
    (torch.ops.seqfuse.*, through the dispatcher), so the loading process needs seqfuse's
    op library: `import seqfuse` in Python, or libseqfuse linked in C++."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # An inference graph (no_grad) in its serving form: the layers' stacked weights,
        # packed panels and folded embedding tables, built by one eager call, enter the
        # graph as constants instead of being rebuilt on every call (a 6-token BiLSTM
        # tagger's call: 59 -> 39 us on the Intel Xeon 167). Not runtime constant folding
        # (aot_inductor.use_runtime_constant_folding): in torch 2.13 a custom op in its
        # constant graph is called through the main graph's extern-node table and crashes.
        with torch.no_grad(), symbolic_packing(), serving_trace(module, example):
            program = torch.export.export(module, example, dynamic_shapes=spec.dynamic_shapes(module),
                                          strict=False)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path


def load_runner(fmt: str, path: Path, *, verify: bool | None = None) -> Callable[..., list]:
    """Load an exported file back: run(*inputs) -> list of output tensors.

    verify: check the file's sha256 against the manifest.json of its folder first (None:
    when there is one, i.e. a published artifact, not an export in progress). TorchScript
    and torch.export files are programs (torch.export.load unpickles its weights and
    constants): load them only from a trusted source; the hash catches corruption only."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    path = Path(path)
    if verify or (verify is None and (path.parent / "manifest.json").is_file()):
        verify_artifact(path.parent, [path.name])
    if fmt == "onnx":
        return OrtGraph(path)
    if fmt == "aoti":
        return AotiGraph(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if fmt == "torchscript":
                loaded = torch.jit.load(str(path))
            else:
                loaded = torch.export.load(str(path)).module()
        except FileNotFoundError:
            raise
        except Exception as exc:  # a truncated or corrupted archive: RuntimeError and others
            raise ArtifactError(f"{path}: cannot load this {fmt} file (truncated or corrupted?): "
                                f"{_first_line(exc)}") from exc
    return lambda *inputs: _as_list(loaded(*inputs))


def _copy_model(model: nn.Module) -> nn.Module:
    """copy.deepcopy(model), except that tensors a forward left on the modules with a graph
    (d2l's decoder keeps its attention weights as `_attention_weights`, so a model that
    ran under autograd holds non-leaf tensors, which deepcopy refuses) are copied detached:
    they are results of a past call, not state the export reads."""
    memo: dict = {}

    def visit(value, depth=0):
        if isinstance(value, torch.Tensor):
            if not value.is_leaf:
                memo[id(value)] = value.detach().clone()
        elif depth < 3 and isinstance(value, (list, tuple)):
            for v in value:
                visit(v, depth + 1)
        elif depth < 3 and isinstance(value, dict):
            for v in value.values():
                visit(v, depth + 1)

    for module in model.modules():
        for name, value in vars(module).items():
            if name not in ("_parameters", "_buffers", "_modules"):
                visit(value)
    return copy.deepcopy(model, memo)


def _exportable(model: nn.Module) -> nn.Module:
    """The module whose graph is exported: `model` itself, or a copy on seqfuse layers."""
    if any(type(m) in _CONVERTED for m in model.modules()):
        return convert(_copy_model(model)).eval()
    return model


def _plan(model: nn.Module, example_inputs, spec, input_names, output_names, dynamic_axes) -> ExportPlan:
    if spec is not None:
        return ExportPlan([ExportPart("model", model, spec)])
    if input_names is not None or dynamic_axes is not None:
        if example_inputs is None or output_names is None or dynamic_axes is None:
            raise ExportSpecError("a model without an export plan needs example_inputs, input_names, "
                                  "output_names and dynamic_axes")
        return ExportPlan([ExportPart("model", model, ExportSpec.from_example(
            tuple(example_inputs), input_names, output_names, dynamic_axes))])
    return plan_for(model)


def _io(names, tensors, axes) -> list[dict]:
    return [{"name": n, "dtype": str(t.dtype).replace("torch.", ""),
             "dims": [a.get(i, int(s)) for i, s in enumerate(t.shape)]}
            for n, t, a in zip(names, tensors, axes)]


def _points(metric: str, reference: float, value: float, maximize: bool) -> float:
    """How much worse `value` is than `reference`, in points (positive = worse)."""
    worse = (reference - value) if maximize else (value - reference)
    return 100 * worse if metric in _UNIT_METRICS else 100 * worse / max(abs(reference), 1e-12)


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled, self.t0 = enabled, time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def _check_args(formats, variants, opset, atol, trace_length, out_dir):
    if out_dir is None:
        raise ValueError("out_dir is required")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {list(formats)}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"variants must be a subset of {VARIANTS}, got unknown {unknown}")
    if variants and "onnx" not in formats:
        raise ValueError("variants are ONNX models: formats must include 'onnx'")
    if not (isinstance(opset, int) and MIN_OPSET <= opset <= MAX_OPSET):
        raise ValueError(f"opset must be an integer in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r}")
    if not (isinstance(atol, (int, float)) and not isinstance(atol, bool) and math.isfinite(atol) and atol > 0):
        raise ValueError(f"atol must be a finite number > 0, got {atol!r}")
    if not (isinstance(trace_length, int) and trace_length >= 2):
        raise ValueError(f"trace_length must be an integer >= 2, got {trace_length!r}")


def is_artifact(folder: Path) -> bool:
    """`folder` is a previous export: a manifest.json that reads, and only the files it lists."""
    try:
        listed = read_manifest(folder)["files"]
    except (OSError, ValueError):
        return False
    return only_regular_files(folder, lambda name: name == "manifest.json" or name in listed)


def check_destinations(out_dir: str | os.PathLike, *, triton_repo: str | os.PathLike | None = None,
                       model_name: str | None = None, parts=(), force: bool = False, inputs=()) -> None:
    """Raise seqfuse.atomic.DestinationError unless the export may write `out_dir` (and the
    Triton model folders of `model_name`'s `parts` in `triton_repo`): see the module
    docstring. inputs: the paths being read (the checkpoint), never replaced."""
    out = check_destination(out_dir, label="out_dir", what="an artifact written by seqfuse export",
                            is_previous=is_artifact, force=force, inputs=inputs)
    if triton_repo is None:
        return
    repo = check_folder(triton_repo, label="triton_repo")
    if out.resolve() in (repo.resolve(), *repo.resolve().parents):
        raise DestinationError("triton_repo", repo, f"is inside the artifact folder {out}, which the next "
                                                    "export replaces")
    if model_name is not None:
        from .triton import check_model_folders
        check_model_folders(repo, model_name, parts, force=force, inputs=(*inputs, out))


def export_model(model: nn.Module, example_inputs: tuple | None = None, out_dir: str | os.PathLike | None = None,
                 *, spec: ExportSpec | None = None, input_names: list[str] | None = None,
                 output_names: list[str] | None = None, dynamic_axes: list[dict[int, str]] | None = None,
                 formats=DEFAULT_FORMATS, opset: int = OPSET, atol: float = 1e-5, variants=(),
                 heldout: list[tuple] | None = None, evaluate: Callable | None = None,
                 metric: tuple[str, bool] | None = None, triton_repo: str | os.PathLike | None = None,
                 model_name: str | None = None, extra_files: dict[str, str | os.PathLike] | None = None,
                 serving: dict | None = None, trace_length: int = 16, seed: int = 0,
                 progress: bool = False, force: bool = False, inputs=()) -> ExportResult:
    """Export `model` to `out_dir` (see the module docstring); raise ParityError, leaving
    nothing behind, if any format differs from eager by more than `atol` anywhere.

    example_inputs: the tracing example. Zoo models have an export plan (seqfuse.export.
      specs.plan_for) and may pass None; any other model passes example_inputs with
      input_names, output_names and dynamic_axes ({axis: "batch" | "time" | ...} per
      input), or a full `spec`. An argument may nest tensors in tuples/lists
      (`forward(enc_X, dec_X, *args)`, `forward(x, (h0, c0))`): input_names then names
      every tensor, flattened in order (depth first), dynamic_axes is one dict per such
      tensor or a dict {input name: {axis: dim name}}, and output_names names the
      flattened outputs (`(y, (h_n, c_n))`: three names). See seqfuse.export.specs.
    heldout: real held-out model inputs (tuples, as the model's forward takes them), added
      to the parity cases (and, for seq2seq, decoded greedily in onnxruntime and eagerly).
    evaluate, metric: evaluate(model_like) -> {metric: value} on the real test split, and
      (the metric that judges variants, higher is better?). Run for the eager model, the
      float32 ONNX model and each variant (in onnxruntime, through OrtModel).
    variants: any of "ort-opt", "fp16", "int8": extra ONNX files with metrics and latency;
      one whose metric is more than 1 point worse than float32's is marked "degraded".
    triton_repo: also write a Triton Inference Server model repository there.
    extra_files: name -> path of files to publish alongside (the vocabularies): regular
      files only, a symbolic link is refused (seqfuse.atomic.open_regular).
    serving: how `seqfuse predict` reads raw input (tokenizer, labels), saved in the manifest.
    force: replace an existing `out_dir` (or Triton model folder) that is not a previous
      export. inputs: paths being read (the checkpoint folder), never replaced, even so.
    """
    formats, variants = tuple(formats), tuple(variants)
    _check_args(formats, variants, opset, atol, trace_length, out_dir)
    say = _Progress(progress)
    model = model.eval()
    if isinstance(example_inputs, torch.Tensor):  # one input: tuple(tensor) would split its rows
        example_inputs = (example_inputs,)
    graph_model = _exportable(model)
    eager_plan = _plan(model, example_inputs, spec, input_names, output_names, dynamic_axes)
    graph_plan = eager_plan if graph_model is model else _plan(
        graph_model, example_inputs, spec, input_names, output_names, dynamic_axes)
    out_dir = Path(out_dir)
    inputs = (*inputs, *(extra_files or {}).values())

    def check() -> None:  # before the work, and again right before the swap
        check_destinations(out_dir, triton_repo=triton_repo, model_name=model_name or type(model).__name__,
                           parts=[p.name for p in eager_plan.parts], force=force, inputs=inputs)
    check()
    for src in (extra_files or {}).values():
        open_regular(src).close()  # a link or a folder is refused before the work too
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _recover(out_dir)
        tmp = make_temp_dir(out_dir.parent, owned_prefix(out_dir, "tmp"))
    except OSError as exc:
        raise OSError(f"cannot write the artifact folder {out_dir}: {exc}") from exc
    gen = torch.Generator().manual_seed(seed)
    heldout = [tuple(h) for h in heldout or []]
    try:
        t0 = time.perf_counter()
        files: dict[str, dict[str, Path]] = {}   # part -> format -> path
        examples: dict[str, tuple] = {}
        for part in graph_plan.parts:
            single = len(graph_plan.parts) == 1
            examples[part.name] = (tuple(example_inputs) if single and example_inputs is not None
                                   else part.spec.make_inputs(3, trace_length, gen, True))
            with torch.inference_mode():
                given = _as_list(part.module(*examples[part.name]))
            if len(given) != len(part.spec.output_names):
                raise ExportSpecError(f"{part.name} ({type(model).__name__}) returns {len(given)} output tensors "
                                      f"(nested ones flattened in order), but output_names names "
                                      f"{len(part.spec.output_names)}: {part.spec.output_names}")
            files[part.name] = {}
            for fmt in formats:
                path = tmp / f"{part.name}{SUFFIX[fmt]}"
                say(f"export {part.name} -> {path.name}")
                try:
                    if fmt == "onnx":
                        export_onnx(part.module, examples[part.name], part.spec, path, opset)
                    elif fmt == "torchscript":
                        export_torchscript(part.module, examples[part.name], path)
                    elif fmt == "aoti":
                        export_aoti(part.module, examples[part.name], part.spec, path)
                    else:
                        export_pt2(part.module, examples[part.name], part.spec, path)
                    files[part.name][fmt] = path
                except ExportError:
                    raise
                except Exception as exc:
                    text = str(exc).strip()
                    hint = ""
                    causes = "\n".join(str(e) for e in _causes(exc))
                    if "data-dependent" in causes or "GuardOnDataDependentSymNode" in causes:
                        hint = f" {_DATA_DEPENDENT}"
                    if "Constraints violated" in text:  # torch.export specialised a Dim
                        fixed = [line.strip() for line in text.splitlines()
                                 if "inferred to be" in line or "specialized" in line][:2]
                        hint = (" torch.export fixed a dimension that dynamic_axes declares "
                                f"dynamic ({'; '.join(fixed) or 'see the cause'}). {_SPECIALISED}")
                    raise ExportError(f"exporting {part.name} ({type(model).__name__}) to {fmt} failed: "
                                      f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
                                      f"{hint}") from exc
        export_seconds = time.perf_counter() - t0

        say("parity: " + ", ".join(formats) + " against eager")
        report = ParityReport(atol)
        held_per_part = [eager_plan.split_inputs(h) for h in heldout]
        for i, (eager_part, part) in enumerate(zip(eager_plan.parts, graph_plan.parts)):
            cases = parity_cases(part.spec, trace_length, gen)
            for j, parts_inputs in enumerate(held_per_part):
                x = parts_inputs[i]
                first = part.spec.flatten(x)[0]
                cases.append((f"real[{j}] b={first.shape[0]}" + (f" t={first.shape[1]}" if first.dim() > 1 else ""), x))
            runners = {fmt: load_runner(fmt, p) for fmt, p in files[part.name].items()}
            report.rows += run_parity(part.name, eager_part.module, runners, cases, part.spec, atol)
        if eager_plan.decoding is not None and "onnx" in formats:
            say("greedy decoding in onnxruntime against eager")
            report.sequence_checks.append(_greedy_check(model, OrtModel.from_files(
                {p: f["onnx"] for p, f in files.items()}, getattr(model, "config", {}),
                eager_plan.decoding), heldout, eager_plan, gen))
        if not report.passed:
            raise ParityError(report)

        variant_info = _variants(model, eager_plan, files, variants, tmp, heldout, evaluate, metric,
                                 trace_length, gen, say) if "onnx" in formats else {}

        say("runtime probe: " + ", ".join(f for f in ("aoti", "onnx") if f in formats))
        runtime_info = _runtime_probe(graph_plan, files, trace_length, gen)
        for name, src in (extra_files or {}).items():
            copy_regular_file(src, tmp / name)
        example_out = {part.name: _as_list(part.module(*examples[part.name])) for part in eager_plan.parts}
        manifest = {
            "model": model_name or type(model).__name__,
            "class": type(model).__name__,
            "config": getattr(model, "config", {}),
            "parts": {part.name: {
                "files": {fmt: p.name for fmt, p in files[part.name].items()},
                "inputs": _io(part.spec.input_names, part.spec.flatten(examples[part.name]), part.spec.dynamic_axes),
                "outputs": _io(part.spec.output_names, example_out[part.name], part.spec.output_axes),
            } for part in eager_plan.parts},
            "vocabularies": sorted(extra_files or {}),
            "serving": serving or {},
            "decoding": eager_plan.decoding or {},
            "opset": opset,
            "parity": report.to_dict(),
            "variants": variant_info,
            "runtime": runtime_info,
            "export_seconds": round(export_seconds, 2),
            "notes": {"torchscript, pt2, aoti": "their graphs call seqfuse ops: `import seqfuse` "
                                                "before torch.jit.load / torch.export.load / "
                                                "torch._inductor.aoti_load_package"},
            "versions": {"seqfuse": seqfuse.__version__, "torch": torch.__version__,
                         "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                         "python": platform.python_version()},
        }
        manifest["files"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                             for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest["settings_sha256"] = settings_sha256(manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        check()
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"published {out_dir}")
    result = ExportResult(out_dir, {name: out_dir / name for name in manifest["files"]}, report, manifest)
    if triton_repo is not None:
        from .triton import write_triton_repo
        result.triton_models = write_triton_repo(out_dir, triton_repo, force=force, inputs=inputs)
        say(f"Triton model repository {triton_repo}: {', '.join(p.name for p in result.triton_models)}")
    return result


def _greedy_check(model: nn.Module, ort_model: OrtModel, heldout: list[tuple], plan: ExportPlan,
                  gen: torch.Generator) -> SequenceCheck:
    """Greedy decoding over the exported encoder + one-step decoder in onnxruntime against
    eager greedy decoding, token for token, on held-out sources (or random ones)."""
    sources = [plan.split_inputs(h)[0] for h in heldout]
    if not sources:
        sources = [plan.parts[0].spec.make_inputs(b, t, gen, True) for b, t in ((1, 5), (8, 12), (8, 30))]
    rows = identical = 0
    first_diff = ""
    for src_ids, src_lengths in sources:
        eager, _ = model.greedy_decode(src_ids, src_lengths)
        served, _ = ort_model.greedy_decode(src_ids, src_lengths)
        for r, (a, b) in enumerate(zip(eager, served)):
            rows += 1
            identical += a == b
            if a != b and not first_diff:
                first_diff = f"first difference: row {r}: eager {a} vs onnxruntime {b}"
    return SequenceCheck("greedy decoding, onnxruntime vs eager", rows, identical, first_diff)


def _latency_inputs(plan: ExportPlan, heldout: list[tuple], trace_length: int,
                    gen: torch.Generator) -> dict[str, list[tuple]]:
    """Inputs per part at batch 1 and batch 8: real held-out batches when given."""
    if heldout:
        sizes = {plan.parts[0].spec.flatten(plan.split_inputs(h)[0])[0].shape[0]: h for h in heldout}
        chosen = {f"b={b}": sizes[b] for b in (1, 8) if b in sizes} or {"heldout": heldout[0]}
        return {k: plan.split_inputs(h) for k, h in chosen.items()}
    return {f"b={b}": [p.spec.make_inputs(b, trace_length, gen, b > 1) for p in plan.parts] for b in (1, 8)}


def cpu_model() -> str:
    """This machine's CPU, as /proc/cpuinfo names it (the platform's name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _runtime_probe(plan: ExportPlan, files: dict[str, dict[str, Path]], trace_length: int,
                   gen: torch.Generator) -> dict:
    """Which runtime serves this model fastest here (`seqfuse predict --runtime auto`): each
    runtime the artifact has (onnxruntime on model.onnx, AOTInductor on model.aoti.pt2) runs
    every part once per call at batch 1, trace_length tokens, timed in its own block (the
    AOTInductor one first: onnxruntime's pool keeps spinning after its calls)."""
    inputs = {p.name: p.spec.make_inputs(1, trace_length, gen, False) for p in plan.parts}
    probe = {}
    for runtime, graph_type in (("aoti", AotiGraph), ("onnx", OrtGraph)):
        if not all(runtime in files[p.name] for p in plan.parts):
            continue
        graphs = {p.name: graph_type(files[p.name][runtime]) for p in plan.parts}

        def call():
            for name, graph in graphs.items():
                graph(*inputs[name])
        probe[runtime] = round(latency_ms(call, warmup=5, min_runs=50, min_seconds=0.3)["median_ms"], 4)
        del graphs
    return {"fastest": min(probe, key=probe.get) if probe else "onnx",
            "probe_median_ms": probe, "batch": 1, "tokens": trace_length,
            "threads": torch.get_num_threads(), "cpu": cpu_model()}


def _variants(model, plan: ExportPlan, files, variants, tmp: Path, heldout, evaluate, metric,
              trace_length, gen, say) -> dict:
    """float32 and each variant: files, agreement with eager on parity-style inputs,
    metrics on the test split, latency per graph."""
    if not variants and evaluate is None:
        return {}
    info: dict[str, dict] = {}
    graphs = {"float32": {p: f["onnx"] for p, f in files.items()}}
    for v in variants:
        graphs[v] = {}
        for part in plan.parts:
            dst = tmp / f"{part.name}.{v}.onnx"
            say(f"variant {v}: {dst.name}")
            graphs[v][part.name] = make_variant(v, files[part.name]["onnx"], dst)
    inputs = _latency_inputs(plan, heldout, trace_length, gen)
    eager_metrics = None
    if evaluate is not None:
        say("metrics: eager model on the test split")
        eager_metrics = evaluate(model)
    for v, paths in graphs.items():
        ort_model = OrtModel.from_files(paths, getattr(model, "config", {}), plan.decoding)
        entry: dict = {"files": {p: path.name for p, path in paths.items()}}
        # agreement with eager on the latency inputs (real held-out data when given)
        rows = []
        for batch_inputs in inputs.values():
            for part, x in zip(plan.parts, batch_inputs):
                with torch.inference_mode():
                    expected = _as_list(part.module(*x))
                rows += compare(part.name, v, "", part.spec, expected, ort_model.graphs[part.name](*x),
                                float("inf"))
        entry["max_abs_vs_eager"] = max(r.max_abs for r in rows)
        top1 = [r.top1_agree for r in rows if r.top1_agree is not None]
        if top1:
            entry["top1_agree_vs_eager"] = min(top1)
        entry["latency_ms"] = {}
        for label, batch_inputs in inputs.items():
            for part, x in zip(plan.parts, batch_inputs):
                graph = ort_model.graphs[part.name]
                feeds = graph.feeds(x)
                shape = "x".join(str(n) for n in part.spec.flatten(x)[0].shape)
                entry["latency_ms"][f"{part.name} {label}"] = {
                    "input": f"{part.spec.input_names[0]} {shape}",
                    **latency_ms(lambda: graph.session.run(None, feeds))}
        if evaluate is not None:
            say(f"metrics: {v} in onnxruntime on the test split")
            entry["metrics"] = evaluate(ort_model)
        info[v] = entry
    if eager_metrics is not None:
        info["eager"] = {"metrics": eager_metrics}
        if metric is not None:
            name, maximize = metric
            ref = info["float32"]["metrics"][name]
            for v in variants:
                change = _points(name, ref, info[v]["metrics"][name], maximize)
                info[v]["metric"] = name
                info[v]["worse_by_points"] = round(change, 3)
                info[v]["degraded"] = change > 1.0
    return info


def _publish(tmp: Path, out_dir: Path) -> None:
    """Swap the finished folder into place (seqfuse.atomic.swap_in, files flushed first),
    so that `out_dir` always names a complete artifact, the previous or the new one,
    whenever the process is killed. Without renameat2 the previous artifact is set aside
    as `.{name}.old-{host}.{pid}-*` for the moment between two renames; a kill there
    leaves no out_dir, and the next export (_recover) puts the set-aside one back
    (`seqfuse predict` names it meanwhile)."""
    swap_in(tmp, out_dir, exchange=_exchange, move_aside=_move_aside, sync=True)


def _exchange(a: Path, b: Path) -> bool:
    """Exchange two existing paths atomically; False where the system cannot."""
    return rename_exchange(a, b)


def _move_aside(out_dir: Path) -> Path:
    old = out_dir.with_name(owned_prefix(out_dir, "old") + os.urandom(4).hex())
    os.rename(out_dir, old)  # a fresh name: nothing there to replace
    return old


def _recover(out_dir: Path) -> None:
    """Before an export: undo what a killed export of the same folder left
    (seqfuse.atomic.recover: a set-aside previous artifact is put back where out_dir is
    missing; leftovers whose process is gone are removed)."""
    recover(out_dir)
