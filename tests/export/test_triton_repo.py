"""seqfuse.export.triton: Triton model repositories written from artifact folders.

The artifacts here are hand-written manifests plus tiny real ONNX graphs (built with
onnx.helper, so no export or native kernels are needed); every generated config.pbtxt is
parsed with Triton's own ModelConfig schema.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from onnx import TensorProto, external_data_helper, helper, numpy_helper
from tritonclient.grpc import model_config_pb2  # Triton's own config schema (requirements.txt)

from seqfuse.export.triton import write_triton_repo

ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
              "int64": TensorProto.INT64, "int32": TensorProto.INT32, "bool": TensorProto.BOOL}
NUMPY_TYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64,
               "TYPE_INT32": np.int32, "TYPE_BOOL": np.bool_}


def _t(name, dtype, dims):
    return {"name": name, "dtype": dtype, "dims": dims}


def _axes(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


# A classifier: one part, named like the model.
CLF = {
    "inputs": [_t("input_ids", "int64", ["batch", "time"]), _t("lengths", "int64", ["batch"])],
    "outputs": [_t("logits", "float32", ["batch", 2]),
                _t("attention_weights", "float32", ["batch", "time"])],
    "nodes": [
        helper.make_node("Cast", ["input_ids"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Softmax", ["x"], ["attention_weights"], axis=1),
        helper.make_node("ReduceSum", ["x", "axes1"], ["s"], keepdims=1),
        helper.make_node("Cast", ["lengths"], ["lf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["lf", "axes1"], ["l"]),
        helper.make_node("Concat", ["s", "l"], ["logits"], axis=1),
    ],
    "initializers": [_axes("axes1", [1])],
}

# A seq2seq model: encoder and decoder parts; covers float16, int32 and bool too.
ENCODER = {
    "inputs": [_t("src_tokens", "int64", ["batch", "src_time"]),
               _t("src_lengths", "int32", ["batch"]),
               _t("src_mask", "bool", ["batch", "src_time"])],
    "outputs": [_t("memory", "float32", ["batch", "src_time", 4]),
                _t("memory_keys", "float16", ["batch", "src_time", 4]),
                _t("state", "float32", ["batch", 8])],
    "nodes": [
        helper.make_node("Cast", ["src_tokens"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["x", "axes2"], ["u"]),
        helper.make_node("Expand", ["u", "shape114"], ["memory"]),
        helper.make_node("Cast", ["memory"], ["memory_keys"], to=TensorProto.FLOAT16),
        helper.make_node("ReduceSum", ["x", "axes1"], ["s"], keepdims=1),
        helper.make_node("Expand", ["s", "shape18"], ["state"]),
    ],
    "initializers": [_axes("axes1", [1]), _axes("axes2", [2]), _axes("shape114", [1, 1, 4]),
                     _axes("shape18", [1, 8])],
}
DECODER = {
    "inputs": [_t("prev_tokens", "int64", ["batch"]), _t("state", "float32", ["batch", 8]),
               _t("memory", "float32", ["batch", "src_time", 4]),
               _t("memory_keys", "float16", ["batch", "src_time", 4]),
               _t("src_lengths", "int32", ["batch"])],
    "outputs": [_t("logits", "float32", ["batch", 8]), _t("next_state", "float32", ["batch", 8]),
                _t("attention_weights", "float32", ["batch", "src_time"])],
    "nodes": [
        helper.make_node("Add", ["state", "state"], ["logits"]),
        helper.make_node("Identity", ["state"], ["next_state"]),
        helper.make_node("ReduceSum", ["memory", "axes2"], ["attention_weights"], keepdims=0),
    ],
    "initializers": [_axes("axes2", [2])],
}


def _value_info(t):
    return helper.make_tensor_value_info(t["name"], ONNX_TYPES[t["dtype"]], t["dims"])


def save_onnx(path: Path, part: dict, **save_kwargs) -> None:
    graph = helper.make_graph(part["nodes"], path.stem, [_value_info(t) for t in part["inputs"]],
                              [_value_info(t) for t in part["outputs"]],
                              initializer=part["initializers"])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path), **save_kwargs)


def make_artifact(path: Path, model: str, parts: dict[str, dict], **save_kwargs) -> Path:
    path.mkdir(parents=True)
    manifest = {"model": model, "opset": 17, "parts": {}}
    for name, part in parts.items():
        save_onnx(path / f"{name}.onnx", part, **save_kwargs)
        manifest["parts"][name] = {
            "files": {"onnx": f"{name}.onnx", "torchscript": f"{name}.ts", "pt2": f"{name}.pt2"},
            "inputs": part["inputs"], "outputs": part["outputs"]}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return path


@pytest.fixture
def clf_artifact(tmp_path) -> Path:
    return make_artifact(tmp_path / "art-clf", "bilstm-attention", {"model": CLF})


@pytest.fixture
def s2s_artifact(tmp_path) -> Path:
    return make_artifact(tmp_path / "art-s2s", "s2s", {"encoder": ENCODER, "decoder": DECODER})


def parse_config(model_dir: Path):
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def type_name(data_type: int) -> str:
    return model_config_pb2.DataType.Name(data_type)


def tensor_fields(tensors) -> dict[str, tuple]:
    """name -> (data type, dims, reshape shape or None)."""
    return {t.name: (type_name(t.data_type), list(t.dims),
                     list(t.reshape.shape) if t.HasField("reshape") else None) for t in tensors}


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root (hidden ones included) with file contents."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def test_single_part_repo(clf_artifact, tmp_path):
    repo = tmp_path / "repo"
    dirs = write_triton_repo(clf_artifact, repo, max_batch_size=8, max_queue_delay_us=250)
    assert dirs == [repo / "bilstm-attention"]
    assert sorted(snapshot(repo)) == ["bilstm-attention", "bilstm-attention/1",
                                      "bilstm-attention/1/model.onnx",
                                      "bilstm-attention/config.pbtxt"]
    assert (dirs[0] / "1" / "model.onnx").read_bytes() == (clf_artifact / "model.onnx").read_bytes()

    cfg = parse_config(dirs[0])
    assert cfg.name == "bilstm-attention"
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 8
    assert cfg.HasField("dynamic_batching")
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    assert len(cfg.instance_group) == 0  # Triton picks the GPU when there is one
    assert [i.name for i in cfg.input] == ["input_ids", "lengths"]
    assert tensor_fields(cfg.input) == {
        "input_ids": ("TYPE_INT64", [-1], None),  # batch dropped, dynamic time -> -1
        "lengths": ("TYPE_INT64", [1], []),  # batch-only: dims [1] + empty reshape
    }
    assert tensor_fields(cfg.output) == {
        "logits": ("TYPE_FP32", [2], None),  # fixed dims kept
        "attention_weights": ("TYPE_FP32", [-1], None),
    }

    text = (dirs[0] / "config.pbtxt").read_text()
    sha = hashlib.sha256((clf_artifact / "manifest.json").read_bytes()).hexdigest()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any(str(clf_artifact.resolve()) in line for line in header)
    assert any(sha in line for line in header)
    assert "same shape" in " ".join(header) and "input_ids: time" in " ".join(header)


def test_two_part_repo(s2s_artifact, tmp_path):
    repo = tmp_path / "repo"
    dirs = write_triton_repo(s2s_artifact, repo)
    assert dirs == [repo / "s2s-encoder", repo / "s2s-decoder"]
    for part, d in zip(("encoder", "decoder"), dirs):
        assert (d / "1" / "model.onnx").read_bytes() == (s2s_artifact / f"{part}.onnx").read_bytes()
        cfg = parse_config(d)
        assert cfg.name == d.name
        assert cfg.platform == "onnxruntime_onnx"
        assert cfg.max_batch_size == 64
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 100

    enc, dec = parse_config(dirs[0]), parse_config(dirs[1])
    assert tensor_fields(enc.input) == {
        "src_tokens": ("TYPE_INT64", [-1], None),
        "src_lengths": ("TYPE_INT32", [1], []),
        "src_mask": ("TYPE_BOOL", [-1], None),
    }
    assert tensor_fields(enc.output) == {
        "memory": ("TYPE_FP32", [-1, 4], None),
        "memory_keys": ("TYPE_FP16", [-1, 4], None),
        "state": ("TYPE_FP32", [8], None),
    }
    assert tensor_fields(dec.input) == {
        "prev_tokens": ("TYPE_INT64", [1], []),
        "state": ("TYPE_FP32", [8], None),
        "memory": ("TYPE_FP32", [-1, 4], None),
        "memory_keys": ("TYPE_FP16", [-1, 4], None),
        "src_lengths": ("TYPE_INT32", [1], []),
    }
    assert tensor_fields(dec.output) == {
        "logits": ("TYPE_FP32", [8], None),
        "next_state": ("TYPE_FP32", [8], None),
        "attention_weights": ("TYPE_FP32", [-1], None),
    }


def test_configs_describe_what_the_models_run(clf_artifact, s2s_artifact, tmp_path):
    """Feed each copied model the batch a Triton client would send per its config (batch 3,
    dynamic dims 5, reshape applied) and check the outputs have the configured shapes."""
    repo = tmp_path / "repo"
    dirs = write_triton_repo(clf_artifact, repo) + write_triton_repo(s2s_artifact, repo)
    rng = np.random.default_rng(0)

    def shape(t):
        dims = list(t.reshape.shape) if t.HasField("reshape") else [5 if d == -1 else d for d in t.dims]
        return [3, *dims]

    for d in dirs:
        cfg = parse_config(d)
        sess = ort.InferenceSession(str(d / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        feeds = {t.name: rng.integers(0, 4, shape(t)).astype(NUMPY_TYPES[type_name(t.data_type)])
                 for t in cfg.input}
        names = [t.name for t in cfg.output]
        for t, out in zip(cfg.output, sess.run(names, feeds)):
            assert out.dtype == NUMPY_TYPES[type_name(t.data_type)], (d.name, t.name)
            assert list(out.shape) == shape(t), (d.name, t.name)


def test_external_data_is_copied_next_to_the_model(tmp_path):
    # CLF with a 2x2 weight on the logits, kept in a file under weights/ (the `axes`
    # constants stay inline: onnxruntime's shape inference needs them).
    weighted = dict(CLF, nodes=[*CLF["nodes"][:-1],
                                helper.make_node("Concat", ["s", "l"], ["pre"], axis=1),
                                helper.make_node("MatMul", ["pre", "w"], ["logits"])],
                    initializers=[*CLF["initializers"],
                                  numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")])
    art = make_artifact(tmp_path / "art", "ext", {"model": weighted})
    proto = onnx.load(str(art / "model.onnx"))
    (w,) = [t for t in proto.graph.initializer if t.name == "w"]
    (art / "weights").mkdir()
    (art / "weights" / "w.bin").write_bytes(w.raw_data)
    external_data_helper.set_external_data(w, "weights/w.bin")
    w.ClearField("raw_data")
    onnx.save(proto, str(art / "model.onnx"))
    (model_dir,) = write_triton_repo(art, tmp_path / "repo")
    assert (model_dir / "1" / "weights" / "w.bin").read_bytes() == (art / "weights" / "w.bin").read_bytes()
    ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


def test_rewrite_replaces_the_model_and_leaves_others(clf_artifact, s2s_artifact, tmp_path):
    repo = tmp_path / "repo"
    write_triton_repo(clf_artifact, repo)
    write_triton_repo(s2s_artifact, repo)
    (repo / "bilstm-attention" / "2").mkdir()
    (repo / "bilstm-attention" / "2" / "model.onnx").write_bytes(b"stale")
    (repo / "other").mkdir()
    (repo / "other" / "config.pbtxt").write_text('name: "other"\n')
    s2s_before = snapshot(repo / "s2s-encoder") | snapshot(repo / "s2s-decoder")

    # a version folder the writer did not make: refused, nothing changed, unless force
    with pytest.raises(ValueError, match=r"bilstm-attention exists and is not a Triton model folder written by "
                                         r"seqfuse .*force=True"):
        write_triton_repo(clf_artifact, repo, max_batch_size=16)
    assert (repo / "bilstm-attention" / "2" / "model.onnx").read_bytes() == b"stale"
    (model_dir,) = write_triton_repo(clf_artifact, repo, max_batch_size=16, force=True)
    assert parse_config(model_dir).max_batch_size == 16
    assert not (model_dir / "2").exists()
    assert sorted(p.name for p in repo.iterdir()) == [
        "bilstm-attention", "other", "s2s-decoder", "s2s-encoder"]  # no temporary leftovers
    assert (repo / "other" / "config.pbtxt").read_text() == 'name: "other"\n'
    assert snapshot(repo / "s2s-encoder") | snapshot(repo / "s2s-decoder") == s2s_before


def _edit_manifest(edit):
    def apply(art: Path):
        path = art / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))
    return apply


def _model_part(m):
    return m["parts"]["model"]


ERROR_CASES = {
    "no manifest": (lambda art: (art / "manifest.json").unlink(), {},
                    FileNotFoundError, "no manifest.json"),
    "no parts": (_edit_manifest(lambda m: m.pop("parts")), {}, ValueError, "no 'parts'"),
    "part without onnx": (_edit_manifest(lambda m: _model_part(m)["files"].pop("onnx")), {},
                          ValueError, r"part 'model'.*no 'onnx' file .*has: pt2, torchscript"),
    "onnx file missing": (lambda art: (art / "model.onnx").unlink(), {},
                          FileNotFoundError, r"part 'model'.*model\.onnx does not exist"),
    "max_batch_size 0": (lambda art: None, {"max_batch_size": 0}, ValueError, "max_batch_size"),
    "unknown dtype": (_edit_manifest(lambda m: _model_part(m)["inputs"][1].update(dtype="complex64")),
                      {}, ValueError, r"'lengths' has dtype 'complex64'"),
    "first dim not batch": (_edit_manifest(lambda m: _model_part(m)["inputs"][0].update(
                                dims=["time", "batch"])),
                            {}, ValueError, r"'input_ids' has first dim 'time'.*batch"),
    "fixed first dim": (_edit_manifest(lambda m: _model_part(m)["outputs"][0].update(dims=[4, 2])),
                        {}, ValueError, r"'logits' has first dim 4"),
    "name not in graph": (_edit_manifest(lambda m: _model_part(m)["inputs"][0].update(name="tokens")),
                          {}, ValueError, r"missing from the graph: \['tokens'\].*not in the "
                                          r"manifest: \['input_ids'\]"),
    "dtype differs from graph": (_edit_manifest(lambda m: _model_part(m)["inputs"][1].update(
                                     dtype="int32")),
                                 {}, ValueError, r"'lengths' is int32 in the manifest but int64"),
    "dynamic where graph is fixed": (_edit_manifest(lambda m: _model_part(m)["outputs"][0].update(
                                         dims=["batch", "classes"])),
                                     {}, ValueError, r"'logits'.*model fixes a dim"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_clear_and_write_nothing(case, clf_artifact, tmp_path):
    breaks, kwargs, error, message = ERROR_CASES[case]
    repo = tmp_path / "repo"
    # A repository that already serves this model (and another): a failed rewrite keeps it.
    write_triton_repo(clf_artifact, repo)
    (repo / "other").mkdir()
    (repo / "other" / "config.pbtxt").write_text('name: "other"\n')
    before = snapshot(repo)
    breaks(clf_artifact)
    with pytest.raises(error, match=message):
        write_triton_repo(clf_artifact, repo, **kwargs)
    assert snapshot(repo) == before

    fresh = tmp_path / "fresh-repo"
    with pytest.raises(error, match=message):
        write_triton_repo(clf_artifact, fresh, **kwargs)
    assert not fresh.exists()


def test_bad_second_part_writes_no_part(s2s_artifact, tmp_path):
    (s2s_artifact / "decoder.onnx").unlink()
    repo = tmp_path / "repo"
    with pytest.raises(FileNotFoundError, match=r"part 'decoder'.*decoder\.onnx does not exist"):
        write_triton_repo(s2s_artifact, repo)
    assert not repo.exists()


def test_failure_while_copying_leaves_nothing_half_written(s2s_artifact, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "other").mkdir(parents=True)
    before = snapshot(repo)
    copyfile = shutil.copyfile

    def failing_copy(src, dst, *args, **kwargs):
        if Path(src).name == "decoder.onnx":
            raise OSError("disk full")
        return copyfile(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        write_triton_repo(s2s_artifact, repo)
    assert snapshot(repo) == before  # neither the encoder nor any .tmp-* folder

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    assert [d.name for d in write_triton_repo(s2s_artifact, repo)] == ["s2s-encoder", "s2s-decoder"]
