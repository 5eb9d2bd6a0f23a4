"""seqfuse.export: ONNX/TorchScript artifacts, parity, atomic publishing, the CLI."""
import json
import subprocess
import sys

import onnx
import pytest
import torch
from conftest import requires_native

from seqfuse.export import ParityError, export_model
from seqfuse.models import LSTMClassifier
from seqfuse.train import save_checkpoint

pytestmark = requires_native


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = LSTMClassifier(50, 12, 20, 3, num_layers=2, bidirectional=True)
    out = tmp_path_factory.mktemp("art") / "clf"
    return model, export_model(model, out)


def test_onnx_uses_standard_lstm_nodes_with_sequence_lens(exported):
    _, result = exported
    proto = onnx.load(str(result.files["onnx"]))
    lstm_nodes = [n for n in proto.graph.node if n.op_type == "LSTM"]
    assert len(lstm_nodes) == 2
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    assert all(len(n.input) >= 5 and n.input[4] for n in lstm_nodes), "sequence_lens must be wired"
    assert proto.opset_import[0].version >= 17
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    assert dims == [["batch", "time"], ["batch"]]
    assert len(proto.graph.value_info) == 0
    assert not (result.out_dir / "model.onnx.data").exists()


def test_parity_covers_required_cases(exported):
    _, result = exported
    cases = {r.case for r in result.parity.rows}
    for needed in ("b=1 t=1", "b=5 t=1", "b=1 t=9", "b=5 t=32", "b=5 t=16 mixed pad"):
        assert needed in cases
    assert {r.format for r in result.parity.rows} == {"onnx", "torchscript"}
    assert result.parity.passed
    assert max(result.parity.worst().values()) < 1e-5


def test_manifest(exported):
    _, result = exported
    m = json.loads((result.out_dir / "manifest.json").read_text())
    assert m["opset"] >= 17 and m["parity"]["passed"]
    assert [i["name"] for i in m["inputs"]] == ["input_ids", "lengths"]
    assert m["inputs"][0]["dims"] == ["batch", "time"]
    import hashlib
    for entry in m["files"].values():
        digest = hashlib.sha256((result.out_dir / entry["path"]).read_bytes()).hexdigest()
        assert digest == entry["sha256"]


def test_artifacts_run_at_new_shapes(exported):
    import onnxruntime as ort
    model, result = exported
    ids = torch.randint(1, 50, (7, 23))
    lengths = torch.tensor([23, 1, 5, 9, 23, 2, 11])
    ids[torch.arange(23) >= lengths.unsqueeze(1)] = 0
    expected = model(ids, lengths)
    sess = ort.InferenceSession(str(result.files["onnx"]))
    got = sess.run(None, {"input_ids": ids.numpy(), "lengths": lengths.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=0)
    ts = torch.jit.load(str(result.files["torchscript"]))
    torch.testing.assert_close(ts(ids, lengths), expected, atol=1e-6, rtol=0)


def test_failed_parity_leaves_previous_artifact(tmp_path):
    model = LSTMClassifier(30, 8, 8, 2)
    out = tmp_path / "a"
    export_model(model, out, formats=["onnx"])
    before = (out / "manifest.json").read_text()
    with pytest.raises(ParityError) as exc:
        export_model(model, out, formats=["onnx"], atol=1e-30)
    assert "parity failed" in str(exc.value) and "NO" in str(exc.value)
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"], "no temporary folder left behind"


def test_cli_export_and_failure_exit_code(tmp_path):
    from seqfuse.data import Vocab
    model = LSTMClassifier(30, 8, 8, 2, bidirectional=True)
    ckpt = save_checkpoint(model, "lstm-classifier", Vocab(["<pad>", "<unk>"] + [f"w{i}" for i in range(28)]),
                           tmp_path / "ckpt")
    ok = subprocess.run([sys.executable, "-m", "seqfuse.cli", "export", str(ckpt), "--out",
                         str(tmp_path / "out"), "--formats", "onnx"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "model.onnx").is_file() and (tmp_path / "out" / "vocab.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "seqfuse.cli", "export", str(ckpt), "--out",
                          str(tmp_path / "bad"), "--formats", "onnx", "--atol", "1e-30"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert "parity failed" in bad.stderr
    assert not (tmp_path / "bad").exists()
