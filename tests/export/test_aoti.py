"""The AOTInductor artifact (issue 22): `--formats ...,aoti` writes model.aoti.pt2, compiled
C++ whose graph calls seqfuse's fused ops, through the same parity suite as every format;
`seqfuse predict --runtime aoti` serves it and agrees with onnxruntime and the eager model;
the export's runtime probe records which runtime is fastest here (`--runtime auto`)."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import requires_native

from seqfuse.export import OrtModel
from seqfuse.export.runtime import AotiGraph, OrtGraph
from seqfuse.zoo.export import export_checkpoint
from seqfuse.zoo.predict import Predictor
from seqfuse.zoo.train import load_checkpoint, train

pytestmark = [requires_native, pytest.mark.slow]

SMALL = {
    "bilstm-attention": dict(embed_dim=16, hidden_size=16, attention_size=8),
    "seq2seq-attention": dict(embed_dim=16, hidden_size=24, attention_size=16),
}
TEXTS = ["a gripping , funny film", "dull and far too long", "the cast is superb"]
WORDS = ["hello", "seqfuse", "a"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("aoti")
    out = {}
    for name, overrides in SMALL.items():
        ckpt = root / f"ckpt-{name}"
        train(name, ckpt, epochs=1, limit=200, progress=False, model_overrides=overrides)
        result = export_checkpoint(ckpt, root / name, formats=("onnx", "aoti"), progress=False)
        out[name] = ckpt, root / name, result
    return out


@pytest.mark.parametrize("name", list(SMALL))
def test_aoti_package_passes_parity_and_is_in_the_manifest(name, artifacts):
    _, art, result = artifacts[name]
    manifest = json.loads((art / "manifest.json").read_text())
    parts = manifest["parts"]
    for part, info in parts.items():
        assert info["files"]["aoti"] == f"{part}.aoti.pt2"
        assert (art / f"{part}.aoti.pt2").is_file()
        assert f"{part}.aoti.pt2" in manifest["files"]
    rows = [r for r in result.parity.rows if r.format == "aoti"]
    # Every parity case (several batches and lengths: dynamic shapes) ran on the package.
    assert len({(r.part, r.case) for r in rows}) >= 4 * len(parts)
    assert all(r.passed for r in rows)
    runtime = manifest["runtime"]
    assert set(runtime["probe_median_ms"]) == {"onnx", "aoti"}
    assert runtime["fastest"] == min(runtime["probe_median_ms"], key=runtime["probe_median_ms"].get)
    assert runtime["cpu"] and runtime["batch"] == 1


def test_predict_on_aoti_matches_onnxruntime_and_eager(artifacts):
    ckpt, art, _ = artifacts["bilstm-attention"]
    onnx_rows = Predictor(art)(TEXTS)
    aoti = Predictor(art, runtime="aoti")
    assert all(isinstance(g, AotiGraph) for g in aoti.model.graphs.values())
    aoti_rows = aoti(TEXTS)
    for a, b in zip(aoti_rows, onnx_rows):
        assert a["label"] == b["label"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
        assert [w for _, w in a["attention"]] == pytest.approx([w for _, w in b["attention"]], abs=1e-5)
    auto = Predictor(art, runtime="auto")
    fastest = json.loads((art / "manifest.json").read_text())["runtime"]["fastest"]
    expected = AotiGraph if fastest == "aoti" else OrtGraph
    assert all(isinstance(g, expected) for g in auto.model.graphs.values())
    # The package runs batches and lengths it was not traced with.
    model, _, _ = load_checkpoint(ckpt)
    graph = aoti.model.graphs["model"]
    for B, T in ((1, 1), (5, 37)):
        ids = torch.randint(1, model.embedding.num_embeddings, (B, T))
        lengths = torch.randint(1, T + 1, (B,))
        with torch.no_grad():
            logits, weights = model(ids, lengths)
        got = graph(ids, lengths)
        torch.testing.assert_close(got[0], logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], weights, atol=1e-5, rtol=1e-5)


def test_seq2seq_decodes_the_same_on_aoti(artifacts):
    _, art, _ = artifacts["seq2seq-attention"]
    assert Predictor(art, runtime="aoti")(WORDS) == Predictor(art)(WORDS)


def test_runtime_errors_name_the_problem(artifacts, tmp_path):
    _, art, _ = artifacts["bilstm-attention"]
    with pytest.raises(ValueError, match="runtime must be one of"):
        OrtModel.from_artifact(art, runtime="tensorrt")
    with pytest.raises(ValueError, match="is an ONNX model: serve it with runtime 'onnx'"):
        OrtModel.from_artifact(art, variant="fp16", runtime="aoti")
    # An artifact exported without the package.
    ckpt, _, _ = artifacts["bilstm-attention"]
    plain = tmp_path / "plain"
    export_checkpoint(ckpt, plain, formats=("onnx",), progress=False, use_data=False)
    with pytest.raises(ValueError, match="no AOTInductor package"):
        OrtModel.from_artifact(plain, runtime="aoti")
    assert json.loads((plain / "manifest.json").read_text())["runtime"]["fastest"] == "onnx"
    assert all(isinstance(g, OrtGraph) for g in OrtModel.from_artifact(plain, runtime="auto").graphs.values())


def test_predict_cli_runtime_aoti(artifacts):
    _, art, _ = artifacts["bilstm-attention"]
    run = [sys.executable, "-m", "seqfuse.cli", "predict", str(art), *TEXTS, "--json"]
    onnx = subprocess.run(run, capture_output=True, text=True, timeout=300)
    aoti = subprocess.run(run + ["--runtime", "aoti"], capture_output=True, text=True, timeout=300)
    assert onnx.returncode == 0 and aoti.returncode == 0, aoti.stderr
    for a, b in zip(json.loads(aoti.stdout), json.loads(onnx.stdout)):
        assert a["label"] == b["label"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    bad = subprocess.run(run + ["--runtime", "nope"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--runtime" in bad.stderr
