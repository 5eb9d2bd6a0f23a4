"""Turn an exported artifact folder into a Triton Inference Server model repository.

    repo_dir/
      bilstm-attention/            one model per manifest part ("model", or
        config.pbtxt               "<model>-encoder" and "<model>-decoder")
        1/model.onnx               byte-identical copy of the artifact's ONNX file

Why a writer and not a hand-written config: Triton serves whatever config.pbtxt says, and
a config that disagrees with its ONNX file (a renamed input, int32 where the model takes
int64, a fixed dim where the model is dynamic) only shows up as a load or request error
on the server. So the config is derived from the artifact's manifest, and the manifest
is checked against the ONNX graph itself before anything is written.

Triton rules that shape the config:
  * max_batch_size > 0 means Triton owns the first dim, so `dims` leave out "batch";
    every manifest tensor must therefore start with the batch dim.
  * `dims` may not be empty: a tensor that is only [batch] (e.g. `lengths`) is declared
    as dims [1] with `reshape: { shape: [ ] }`, so the model still sees shape [batch].
  * dynamic (named) dims become -1. The dynamic batcher only merges requests whose
    shapes are identical, so variable-length requests of different lengths run as
    separate batches unless the client pads them to a few fixed lengths.
  * no instance_group: Triton then places one instance on each GPU, or on CPU without one.

Each model folder is built in a hidden temporary folder inside repo_dir (the same
filesystem, which matters when the repository is a mounted volume) and renamed into
place, replacing a previous folder of that name; other models in the repository are
left alone. Everything is validated before the first byte is written, and a failure
while copying removes what was copied, so no half-written model folder remains.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.text_encoding import CEscape

from seqfuse.atomic import make_temp_dir, swap_in

from .exporter import sha256_file

BATCH_DIM = "batch"
PLATFORM = "onnxruntime_onnx"

# manifest dtype -> (Triton data type, ONNX element type)
DTYPES: dict[str, tuple[str, int]] = {
    "float32": ("TYPE_FP32", onnx.TensorProto.FLOAT),
    "float16": ("TYPE_FP16", onnx.TensorProto.FLOAT16),
    "bfloat16": ("TYPE_BF16", onnx.TensorProto.BFLOAT16),
    "float64": ("TYPE_FP64", onnx.TensorProto.DOUBLE),
    "int64": ("TYPE_INT64", onnx.TensorProto.INT64),
    "int32": ("TYPE_INT32", onnx.TensorProto.INT32),
    "int16": ("TYPE_INT16", onnx.TensorProto.INT16),
    "int8": ("TYPE_INT8", onnx.TensorProto.INT8),
    "uint8": ("TYPE_UINT8", onnx.TensorProto.UINT8),
    "bool": ("TYPE_BOOL", onnx.TensorProto.BOOL),
}


@dataclass
class _Tensor:
    name: str
    dtype: str
    dims: list[str | int]  # including the leading batch dim; str = dynamic


@dataclass
class _Model:
    name: str
    onnx_path: Path
    config: str
    external: list[str] = field(default_factory=list)  # external-data files, relative


def write_triton_repo(artifact_dir: str | os.PathLike, repo_dir: str | os.PathLike, *,
                      max_batch_size: int = 64, max_queue_delay_us: int = 100,
                      onnx_key: str = "onnx") -> list[Path]:
    """Write one Triton model per manifest part of `artifact_dir` into `repo_dir`
    (see the module docstring) and return the model folders, in manifest order.

    max_batch_size: the largest batch Triton forms (>= 1).
    max_queue_delay_us: how long the dynamic batcher waits to fill a batch.
    onnx_key: the key of the ONNX file in each part's "files".

    Raises FileNotFoundError for a missing manifest or model file, ValueError for a
    manifest Triton cannot serve or one that disagrees with its ONNX graph; in either
    case nothing is written.
    """
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
    if (isinstance(max_queue_delay_us, bool) or not isinstance(max_queue_delay_us, int)
            or max_queue_delay_us < 0):
        raise ValueError(f"max_queue_delay_us must be an int >= 0, got {max_queue_delay_us!r}")
    artifact_dir = Path(artifact_dir)
    repo_dir = Path(repo_dir)
    manifest, manifest_sha = _load_manifest(artifact_dir)
    models = [_plan_model(artifact_dir, manifest, manifest_sha, part, spec, onnx_key,
                          max_batch_size, max_queue_delay_us)
              for part, spec in manifest["parts"].items()]
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"{artifact_dir / 'manifest.json'}: parts give duplicate model names {names}")

    created_repo = not repo_dir.exists()
    repo_dir.mkdir(parents=True, exist_ok=True)
    tmps: list[Path] = []
    try:
        for m in models:
            tmp = make_temp_dir(repo_dir, f".tmp-{m.name}-")
            tmps.append(tmp)
            version = tmp / "1"
            version.mkdir()
            shutil.copyfile(m.onnx_path, version / "model.onnx")
            for rel in m.external:
                (version / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(m.onnx_path.parent / rel, version / rel)
            (tmp / "config.pbtxt").write_text(m.config, encoding="utf-8")
        for m, tmp in zip(models, tmps):
            _publish(tmp, repo_dir / m.name)
    except BaseException:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
        if created_repo:
            try:
                repo_dir.rmdir()  # only if still empty
            except OSError:
                pass
        raise
    return [repo_dir / m.name for m in models]


def _load_manifest(artifact_dir: Path) -> tuple[dict, str]:
    path = artifact_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{artifact_dir} is not an exported artifact: no manifest.json in it")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object")
    model = manifest.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError(f"{path}: 'model' must be a non-empty string, got {model!r}")
    parts = manifest.get("parts")
    if not isinstance(parts, dict) or not parts:
        raise ValueError(f"{path}: no 'parts' (expected e.g. {{\"model\": {{\"files\": ..., "
                         f"\"inputs\": ..., \"outputs\": ...}}}}); was it written by an older seqfuse.export?")
    return manifest, hashlib.sha256(raw).hexdigest()


def _model_name(manifest: dict, part: str, where: str) -> str:
    name = manifest["model"] if part == "model" else f"{manifest['model']}-{part}"
    if name.startswith(".") or any(c in name for c in "/\\\0\n") or name in ("", "."):
        raise ValueError(f"{where}: {name!r} cannot be a Triton model folder name")
    return name


def _plan_model(artifact_dir: Path, manifest: dict, manifest_sha: str, part: str, spec,
                onnx_key: str, max_batch_size: int, max_queue_delay_us: int) -> _Model:
    where = f"{artifact_dir / 'manifest.json'}: part {part!r}"
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected an object, got {type(spec).__name__}")
    name = _model_name(manifest, part, where)
    files = spec.get("files") or {}
    if not isinstance(files, dict) or onnx_key not in files:
        have = ", ".join(sorted(files)) if isinstance(files, dict) else repr(files)
        raise ValueError(f"{where}: no {onnx_key!r} file in its files (has: {have or 'none'})")
    entry = files[onnx_key]
    # "model.onnx", or {"path": "model.onnx", "sha256": ...}
    rel = entry.get("path") if isinstance(entry, dict) else entry
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"{where}: files[{onnx_key!r}] must name a file, got {entry!r}")
    onnx_path = artifact_dir / rel
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{where}: ONNX file {onnx_path} does not exist")
    if isinstance(entry, dict) and entry.get("sha256"):
        sha = sha256_file(onnx_path)
        if sha != entry["sha256"]:
            raise ValueError(f"{where}: {onnx_path} has sha256 {sha}, manifest says {entry['sha256']}")

    inputs = _tensors(spec.get("inputs"), f"{where} inputs")
    outputs = _tensors(spec.get("outputs"), f"{where} outputs")
    proto = onnx.load(str(onnx_path), load_external_data=False)
    _check_onnx(proto, onnx_path, inputs, outputs, where)
    external = _external_files(proto, onnx_path, where)

    header = [f"# Generated by seqfuse.export.triton from artifact {json.dumps(str(artifact_dir.resolve()))},",
              f"# part {json.dumps(part)} ({json.dumps(rel)}), manifest.json sha256 {manifest_sha}."]
    variable = [f"{t.name}: {', '.join(d for d in t.dims[1:] if isinstance(d, str))}"
                for t in inputs if any(isinstance(d, str) for d in t.dims[1:])]
    if variable:
        header += [f"# Variable-length inputs ({'; '.join(variable)}): Triton's dynamic batcher only",
                   "# merges requests of the same shape, so requests of different lengths run in",
                   "# separate batches; pad on the client to a few fixed lengths to batch them."]
    else:
        header += ["# Every non-batch dim is fixed, so the dynamic batcher can merge any requests",
                   "# (it only ever merges requests of the same shape)."]
    config = _config_text(name, inputs, outputs, max_batch_size, max_queue_delay_us, header)
    return _Model(name, onnx_path, config, external)


def _tensors(specs, where: str) -> list[_Tensor]:
    if not isinstance(specs, list) or not specs:
        raise ValueError(f"{where}: expected a non-empty list of {{name, dtype, dims}}, got {specs!r}")
    out: list[_Tensor] = []
    for s in specs:
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not s["name"]:
            raise ValueError(f"{where}: each entry needs a non-empty 'name', got {s!r}")
        name, dtype, dims = s["name"], s.get("dtype"), s.get("dims")
        if dtype not in DTYPES:
            raise ValueError(f"{where}: {name!r} has dtype {dtype!r}, which has no Triton type "
                             f"(known: {', '.join(DTYPES)})")
        if not isinstance(dims, list) or not dims:
            raise ValueError(f"{where}: {name!r} needs a non-empty 'dims' list, got {dims!r}")
        if dims[0] != BATCH_DIM:
            raise ValueError(f"{where}: {name!r} has first dim {dims[0]!r}, expected the batch dim "
                             f"{BATCH_DIM!r} (max_batch_size > 0 makes Triton own the first dim)")
        for d in dims:
            fixed = isinstance(d, int) and not isinstance(d, bool) and d >= 1
            if not (fixed or (isinstance(d, str) and d)):
                raise ValueError(f"{where}: {name!r} has dim {d!r}; dims are names (dynamic) "
                                 f"or ints >= 1 (fixed)")
        out.append(_Tensor(name, dtype, dims))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: duplicate names in {names}")
    return out


def _check_onnx(proto: onnx.ModelProto, path: Path, inputs: list[_Tensor],
                outputs: list[_Tensor], where: str) -> None:
    """The manifest must describe the graph exactly: names, element types, ranks, and no
    dim the manifest calls dynamic (or another size) that the model fixes."""
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}  # IR < 4 lists them as inputs too
    for kind, declared, values in (("inputs", inputs, [v for v in graph.input if v.name not in initializers]),
                                   ("outputs", outputs, list(graph.output))):
        have = {v.name: v for v in values}
        want = [t.name for t in declared]
        if set(have) != set(want):
            raise ValueError(f"{where}: manifest {kind} {want} do not match the graph {kind} "
                             f"{list(have)} of {path} (missing from the graph: "
                             f"{sorted(set(want) - set(have))}, not in the manifest: "
                             f"{sorted(set(have) - set(want))})")
        for t in declared:
            v = have[t.name]
            if not v.type.HasField("tensor_type"):
                raise ValueError(f"{where}: {t.name!r} is not a tensor in {path}")
            tt = v.type.tensor_type
            if tt.elem_type != DTYPES[t.dtype][1]:
                raise ValueError(f"{where}: {t.name!r} is {t.dtype} in the manifest but "
                                 f"{onnx.TensorProto.DataType.Name(tt.elem_type).lower()} in {path}")
            if not tt.HasField("shape"):
                continue  # rank unknown in the graph: nothing to compare
            graph_dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                          for d in tt.shape.dim]
            if len(graph_dims) != len(t.dims):
                raise ValueError(f"{where}: {t.name!r} has dims {t.dims} in the manifest but "
                                 f"{graph_dims} in {path}")
            for m, g in zip(t.dims, graph_dims):
                if isinstance(g, int) and m != g:
                    raise ValueError(f"{where}: {t.name!r} has dims {t.dims} in the manifest but "
                                     f"{graph_dims} in {path} (the model fixes a dim the "
                                     f"manifest gives as {m!r})")


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for s in graph.sparse_initializer:
        yield s.values
        yield s.indices
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _graph_tensors(a.g)
            for g in a.graphs:
                yield from _graph_tensors(g)


def _external_files(proto: onnx.ModelProto, onnx_path: Path, where: str) -> list[str]:
    """Relative paths of the external-data files the model needs next to it."""
    found: list[str] = []
    for t in _graph_tensors(proto.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = {e.key: e.value for e in t.external_data}.get("location", "")
        p = Path(loc)
        if not loc or p.is_absolute() or ".." in p.parts:
            raise ValueError(f"{where}: {onnx_path} keeps tensor {t.name!r} in external data at "
                             f"{loc!r}, which is not a path inside the artifact")
        if not (onnx_path.parent / p).is_file():
            raise FileNotFoundError(f"{where}: external data file {onnx_path.parent / p} of "
                                    f"{onnx_path} does not exist")
        if loc not in found:
            found.append(loc)
    return found


def _dims_text(dims: list[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]" if dims else "[ ]"


def _tensor_text(t: _Tensor) -> str:
    dims = [-1 if isinstance(d, str) else d for d in t.dims[1:]]
    lines = ["  {",
             f'    name: "{CEscape(t.name, as_utf8=True)}"',
             f"    data_type: {DTYPES[t.dtype][0]}"]
    if dims:
        lines.append(f"    dims: {_dims_text(dims)}")
    else:  # batch-only tensor: Triton needs non-empty dims; the model sees [batch]
        lines += [f"    dims: {_dims_text([1])}", f"    reshape: {{ shape: {_dims_text([])} }}"]
    return "\n".join(lines + ["  }"])


def _config_text(name: str, inputs: list[_Tensor], outputs: list[_Tensor], max_batch_size: int,
                 max_queue_delay_us: int, header: list[str]) -> str:
    """config.pbtxt in protobuf text format (Triton's ModelConfig schema)."""
    return "\n".join([
        *header,
        f'name: "{CEscape(name, as_utf8=True)}"',
        f'platform: "{PLATFORM}"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        ",\n".join(_tensor_text(t) for t in inputs),
        "]",
        "output [",
        ",\n".join(_tensor_text(t) for t in outputs),
        "]",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        "",
    ])


def _publish(tmp: Path, dest: Path) -> None:
    """Swap a finished model folder into place (seqfuse.atomic.swap_in)."""
    swap_in(tmp, dest, sync=True)
