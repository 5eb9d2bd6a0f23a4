"""From a trained checkpoint to serving: `seqfuse export` on small models trained here on
their real data (a few hundred examples, one epoch), with real held-out inputs in the
parity suite, the variants measured on the test split, a Triton model repository checked
against Triton's own config schema, and `seqfuse predict` agreeing with the eager model."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import requires_native
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from seqfuse.zoo.data import Vocab, pad_batch
from seqfuse.export import OrtModel, export_model
from seqfuse.zoo.predict import PredictError, Predictor, tokens_of
from seqfuse.zoo.export import export_checkpoint
from seqfuse.zoo.models import BiGRUClassifier
from seqfuse.zoo.train import load_checkpoint, train

pytestmark = requires_native

SMALL = {
    "bilstm-attention": dict(embed_dim=16, hidden_size=16, attention_size=8),
    "seq2seq-attention": dict(embed_dim=16, hidden_size=24, attention_size=16),
    "lstm-tagger": dict(embed_dim=8, hidden_size=16),
    "lstm-regressor": dict(hidden_size=8),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """name -> (checkpoint dir, artifact dir, ExportResult); triton repo shared."""
    root = tmp_path_factory.mktemp("serving")
    out = {}
    for name, overrides in SMALL.items():
        ckpt = root / f"ckpt-{name}"
        train(name, ckpt, epochs=1, limit=300, progress=False, model_overrides=overrides)
        result = export_checkpoint(ckpt, root / name, variants=("ort-opt", "fp16", "int8"),
                                   triton_repo=root / "triton")
        out[name] = ckpt, root / name, result
    return out


@pytest.mark.parametrize("name", list(SMALL))
def test_checkpoint_export_uses_real_heldout_inputs(name, served):
    _, art, result = served[name]
    assert result.parity.passed
    real = [r for r in result.parity.rows if r.case.startswith("real[")]
    assert {r.case.split()[1] for r in real} == {"b=1", "b=3", "b=8", "b=64"}
    assert all(r.passed for r in real)
    m = result.manifest
    assert m["serving"]["input"] in ("text", "dense")
    for vocab in m["vocabularies"]:
        assert (art / vocab).read_bytes() == (served[name][0] / vocab).read_bytes()


def test_seq2seq_greedy_decoding_matches_on_real_words(served):
    check = served["seq2seq-attention"][2].parity.sequence_checks[0]
    assert check.rows == 1 + 3 + 8 + 64 and check.passed


@pytest.mark.parametrize("name", list(SMALL))
def test_variants_have_test_metrics_latency_and_a_verdict(name, served):
    _, art, result = served[name]
    v = result.manifest["variants"]
    assert set(v) == {"eager", "float32", "ort-opt", "fp16", "int8"}
    metric = result.manifest["variants"]["int8"]["metric"]
    # the float32 ONNX model scores what the eager model scores (same predictions)
    assert v["float32"]["metrics"][metric] == pytest.approx(v["eager"]["metrics"][metric], abs=1e-6)
    for variant in ("ort-opt", "fp16", "int8"):
        entry = v[variant]
        assert set(entry["metrics"]) == set(v["float32"]["metrics"])
        assert entry["degraded"] == (entry["worse_by_points"] > 1.0)
        for part, fname in entry["files"].items():
            assert (art / fname).is_file() and fname == f"{part}.{variant}.onnx"
        assert all(t["median_ms"] > 0 for t in entry["latency_ms"].values())
        assert {k.split()[1] for k in entry["latency_ms"]} == {"b=1", "b=8"}
    assert v["ort-opt"]["max_abs_vs_eager"] < 1e-4
    # every variant is served through the same interface
    model = OrtModel.from_artifact(art, "int8")
    assert set(model.graphs) == set(result.manifest["parts"])


def test_a_variant_that_loses_more_than_a_point_is_marked_degraded(tmp_path):
    """The verdict itself: an evaluation that scores the int8 graph 2 points lower."""
    torch.manual_seed(0)
    model = BiGRUClassifier(20, 8, 8, 2).eval()

    def evaluate(m):
        served_int8 = isinstance(m, OrtModel) and "int8" in m.graphs["model"].path.name
        return {"accuracy": 0.80 - (0.02 if served_int8 else 0.0)}

    result = export_model(model, None, tmp_path / "art", formats=["onnx"], variants=["ort-opt", "int8"],
                          evaluate=evaluate, metric=("accuracy", True), trace_length=6)
    v = result.manifest["variants"]
    assert v["int8"]["degraded"] is True and v["int8"]["worse_by_points"] == pytest.approx(2.0)
    assert v["ort-opt"]["degraded"] is False


def test_triton_repository_parses_with_tritons_schema(served):
    repo = served["bilstm-attention"][1].parent / "triton"
    names = sorted(p.name for p in repo.iterdir())
    assert names == ["bilstm-attention", "lstm-regressor", "lstm-tagger", "seq2seq-attention-decoder",
                     "seq2seq-attention-encoder"]
    for name in names:
        config = text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size > 0 and config.HasField("dynamic_batching")
        assert (repo / name / "1" / "model.onnx").is_file()
    config = text_format.Parse((repo / "bilstm-attention" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    inputs = {i.name: i for i in config.input}
    assert list(inputs["input_ids"].dims) == [-1]
    assert inputs["input_ids"].data_type == model_config_pb2.TYPE_INT64
    assert list(inputs["lengths"].dims) == [1] and list(inputs["lengths"].reshape.shape) == []
    outputs = {o.name: o for o in config.output}
    assert list(outputs["logits"].dims) == [2] and outputs["logits"].data_type == model_config_pb2.TYPE_FP32
    dec = text_format.Parse((repo / "seq2seq-attention-decoder" / "config.pbtxt").read_text(),
                            model_config_pb2.ModelConfig())
    assert list({i.name: i for i in dec.input}["memory"].dims) == [-1, 48]


# -- seqfuse predict ------------------------------------------------------------------

TEXTS = ["a gorgeous , witty , seductive movie .", "dull", "the plot is a mess and the acting is worse ,"
         " but the music is great", "zzzz unknownword"]


def test_predict_text_matches_the_eager_model(served):
    ckpt, art, _ = served["bilstm-attention"]
    model, _, vocab_path = load_checkpoint(ckpt)
    vocab = Vocab.load(vocab_path)
    rows = Predictor(art)(TEXTS, batch_size=3)
    serving = json.loads((art / "manifest.json").read_text())["serving"]
    ids, lengths = pad_batch([vocab.encode(tokens_of(t, serving)) for t in TEXTS])
    with torch.no_grad():
        logits, weights = model(ids, lengths)
    probs = torch.softmax(logits, -1)
    for r, row in enumerate(rows):
        assert row["label"] == ["rotten", "fresh"][int(probs[r].argmax())]
        assert row["probabilities"]["fresh"] == pytest.approx(float(probs[r, 1]), abs=1e-5)
        assert [w for _, w in row["attention"]] == pytest.approx(weights[r, :int(lengths[r])].tolist(), abs=1e-5)


def test_predict_seq2seq_and_tagger_match_the_eager_models(served):
    ckpt, art, _ = served["seq2seq-attention"]
    model, _, vocab_path = load_checkpoint(ckpt)
    chars, phones = Vocab.load(vocab_path), Vocab.load(ckpt / "tgt_vocab.json")
    words = ["hello", "a", "phonetics", "seqfuse"]
    ids, lengths = pad_batch([chars.encode(list(w)) for w in words])
    hyps, _ = model.greedy_decode(ids, lengths)
    rows = Predictor(art)(words)
    assert [r["output"] for r in rows] == [" ".join(phones.itos[t] for t in h) for h in hyps]

    ckpt, art, _ = served["lstm-tagger"]
    model, _, vocab_path = load_checkpoint(ckpt)
    vocab, tags = Vocab.load(vocab_path), Vocab.load(ckpt / "tags.json")
    rows = Predictor(art)(["K AE1 T", "HH AH0 L OW1"])
    assert rows[0]["tokens"] == ["K", "AE", "T"]
    ids, lengths = pad_batch([vocab.encode(r["tokens"]) for r in rows])
    pred = model(ids, lengths).argmax(-1)
    for r, row in enumerate(rows):
        assert row["tags"] == [tags.itos[k] for k in pred[r, :len(row["tokens"])].tolist()]


def test_predict_dense_input_from_json_and_npy(served, tmp_path):
    ckpt, art, _ = served["lstm-regressor"]
    model, _, _ = load_checkpoint(ckpt)
    x = np.random.default_rng(0).normal(0, 0.02, (2, 30, 5)).astype(np.float32)
    np.save(tmp_path / "w.npy", x[1])
    rows = Predictor(art)([json.dumps(x[0].tolist()), str(tmp_path / "w.npy")])
    expected = model(torch.from_numpy(x)).tolist()
    assert [r["prediction"] for r in rows] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(PredictError, match=r"expected shape \[30, 5\]"):
        Predictor(art)(["[[1, 2], [3, 4]]"])
    with pytest.raises(PredictError, match="NaN"):
        Predictor(art)([json.dumps(np.full((30, 5), np.nan).tolist())])


def test_predict_cli_json_and_errors(served, tmp_path):
    art = served["bilstm-attention"][1]
    (tmp_path / "in.txt").write_text("a fine film\n\nawful\n")
    run = subprocess.run([sys.executable, "-m", "seqfuse.cli", "predict", str(art), "great fun", "--file",
                          str(tmp_path / "in.txt"), "--json"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [r["input"] for r in rows] == ["great fun", "a fine film", "awful"]
    assert {r["label"] for r in rows} <= {"rotten", "fresh"}
    expected = Predictor(art)(["great fun", "a fine film", "awful"])
    assert [r["probabilities"] for r in rows] == [r["probabilities"] for r in expected]
    bad = subprocess.run([sys.executable, "-m", "seqfuse.cli", "predict", str(tmp_path / "nope"), "x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no manifest.json" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "seqfuse.cli", "predict", str(art), "x", "--variant", "int4"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "int4" in bad.stderr


def test_export_cli(served, tmp_path):
    ckpt = served["lstm-tagger"][0]
    ok = subprocess.run([sys.executable, "-m", "seqfuse.cli", "export", str(ckpt), "--out", str(tmp_path / "out"),
                         "--formats", "onnx,pt2", "--no-data", "--quiet"], capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json", "model.onnx", "model.pt2", "tags.json", "vocab.json"]
    assert "pt2" in ok.stdout and "yes" in ok.stdout
    for args, code, msg in [(["--formats", "onnx,tflite"], 2, "--formats"), (["--variants", "int4"], 2, "--variants"),
                            (["--atol", "1e-30", "--no-data"], 1, "parity failed")]:
        bad = subprocess.run([sys.executable, "-m", "seqfuse.cli", "export", str(ckpt), "--out",
                              str(tmp_path / "bad"), "--quiet", *args], capture_output=True, text=True, timeout=300)
        assert bad.returncode == code and msg in bad.stderr, bad.stderr
        assert not (tmp_path / "bad").exists()
    missing = subprocess.run([sys.executable, "-m", "seqfuse.cli", "export", str(tmp_path / "nope"), "--out",
                              str(tmp_path / "bad")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
