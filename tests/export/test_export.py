"""seqfuse.export end to end: every zoo model (small random weights, odd sizes) to ONNX,
TorchScript and torch.export, proven by the parity suite; the same models built from
torch.nn layers; a plain torch.nn model; seq2seq as encoder + one-step decoder with greedy
decoding in onnxruntime; the manifest; and the failure paths (an op with no ONNX
translation, a parity failure, an unwritable output folder) leaving nothing behind."""
import copy
import hashlib
import json

import onnx
import pytest
import torch
from conftest import ZOO_CONFIGS, requires_native
from torch import nn

from seqfuse.export import ExportError, OrtModel, ParityError, export_model, load_runner, plan_for
from seqfuse.zoo.models import MODELS
from seqfuse.nn import to_torch

pytestmark = requires_native

TRACE = 6  # traced length: parity at lengths 1, 3, 6 and 12 (the transformer's max_len is 16)
NAMES = list(MODELS)


def build(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name](**ZOO_CONFIGS[name]).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model, ExportResult) for every zoo model, all three formats."""
    root = tmp_path_factory.mktemp("zoo")
    out = {}
    for name in NAMES:
        model = build(name)
        out[name] = model, export_model(model, None, root / name, model_name=name, trace_length=TRACE)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_every_zoo_model_passes_parity_in_every_format(name, exported):
    model, result = exported[name]
    report = result.parity
    assert report.passed
    parts = [p.name for p in plan_for(model).parts]
    assert {r.part for r in report.rows} == set(parts)
    assert {r.format for r in report.rows} == {"onnx", "torchscript", "pt2"}
    assert max(report.worst().values()) < 1e-5
    cases = {r.case for r in report.rows}
    for batch in (1, 3, 8):
        for length in (1, 3, TRACE, 2 * TRACE):
            assert f"b={batch} t={length}" in cases
    spec = plan_for(model).parts[0].spec
    assert any("mixed pad" in c for c in cases) == spec.has_lengths
    # every output of every part is compared in every case
    outputs = {(r.part, r.output) for r in report.rows}
    assert outputs == {(p.name, o) for p in plan_for(model).parts for o in p.spec.output_names}
    top1 = [r.top1_agree for r in report.rows if r.top1_agree is not None]
    if spec.top1_outputs or name == "seq2seq-attention":
        assert top1 and min(top1) == 1.0


@pytest.mark.parametrize("name", NAMES)
def test_onnx_files_are_standard_self_contained_and_dynamic(name, exported):
    model, result = exported[name]
    for part in plan_for(model).parts:
        proto = onnx.load(str(result.out_dir / f"{part.name}.onnx"))
        assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
        assert [i.name for i in proto.graph.input] == part.spec.input_names
        assert [o.name for o in proto.graph.output] == part.spec.output_names
        assert len(proto.graph.value_info) == 0, "stale shape information must be removed"
        batch_dims = [i.type.tensor_type.shape.dim[0].dim_param for i in proto.graph.input]
        assert batch_dims == ["batch"] * len(batch_dims)
        recurrent = [n for n in proto.graph.node if n.op_type in ("LSTM", "GRU")]
        if name == "transformer-classifier":
            assert not recurrent and "Softmax" in {n.op_type for n in proto.graph.node}
            continue
        assert recurrent, "recurrent layers must be ONNX LSTM/GRU nodes"
        if part.spec.has_lengths and part.name != "decoder":
            assert all(len(n.input) > 4 and n.input[4] for n in recurrent[:1]), "sequence_lens must be wired"
    assert not list(result.out_dir.glob("*.data")), "one self-contained file"


def test_seq2seq_is_an_encoder_and_a_one_step_decoder_and_decodes_alike(exported):
    model, result = exported["seq2seq-attention"]
    m = result.manifest
    assert set(m["parts"]) == {"encoder", "decoder"}
    dec = m["parts"]["decoder"]
    assert [i["name"] for i in dec["inputs"]] == ["prev_tokens", "state", "memory", "memory_keys", "src_lengths"]
    assert [o["name"] for o in dec["outputs"]] == ["logits", "next_state", "attention_weights"]
    assert dec["inputs"][2]["dims"] == ["batch", "src_time", 2 * model.config["hidden_size"]]
    check = result.parity.sequence_checks[0]
    assert check.passed and check.rows >= 17
    # and again here, on sources the export never saw, with a length-1 row
    ort_model = OrtModel.from_artifact(result.out_dir)
    src = torch.randint(4, 13, (6, 9))
    lengths = torch.tensor([9, 1, 4, 7, 2, 9])
    src[torch.arange(9) >= lengths.unsqueeze(1)] = 0
    eager, eager_w = model.greedy_decode(src, lengths)
    served, served_w = ort_model.greedy_decode(src, lengths)
    assert served == eager
    torch.testing.assert_close(served_w, eager_w, atol=1e-5, rtol=0)


def test_manifest(exported):
    model, result = exported["bilstm-attention"]
    m = json.loads((result.out_dir / "manifest.json").read_text())
    assert m["model"] == "bilstm-attention" and m["config"] == model.config and m["opset"] == 18
    part = m["parts"]["model"]
    assert part["inputs"] == [{"name": "input_ids", "dtype": "int64", "dims": ["batch", "time"]},
                              {"name": "lengths", "dtype": "int64", "dims": ["batch"]}]
    assert part["outputs"] == [{"name": "logits", "dtype": "float32", "dims": ["batch", 3]},
                               {"name": "attention_weights", "dtype": "float32", "dims": ["batch", "time"]}]
    assert part["files"] == {"onnx": "model.onnx", "torchscript": "model.ts", "pt2": "model.pt2"}
    on_disk = sorted(p.name for p in result.out_dir.iterdir() if p.name != "manifest.json")
    assert sorted(m["files"]) == on_disk
    for fname, entry in m["files"].items():
        data = (result.out_dir / fname).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
    assert set(m["versions"]) >= {"seqfuse", "torch", "onnx", "onnxruntime"}
    assert m["parity"]["passed"] and len(m["parity"]["rows"]) == len(result.parity.rows)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
def test_artifacts_load_back_and_run_at_new_shapes(fmt, exported):
    model, result = exported["bigru-classifier"]
    run = load_runner(fmt, result.out_dir / {"onnx": "model.onnx", "torchscript": "model.ts", "pt2": "model.pt2"}[fmt])
    ids = torch.randint(1, 13, (7, 23))
    lengths = torch.tensor([23, 1, 5, 9, 23, 2, 11])
    ids[torch.arange(23) >= lengths.unsqueeze(1)] = 0
    torch.testing.assert_close(run(ids, lengths)[0], model(ids, lengths), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["lstm-classifier", "bigru-classifier", "bilstm-attention",
                                  "transformer-classifier", "lstm-tagger", "seq2seq-attention"])
def test_models_on_torch_nn_layers_export_through_seqfuse_ops(name, tmp_path):
    """to_torch(model) runs packed torch.nn layers, which do not export with lengths:
    the exporter converts a copy, and parity is against the torch.nn model itself."""
    model = to_torch(build(name))
    assert any(isinstance(m, (nn.LSTM, nn.GRU, nn.TransformerEncoder)) for m in model.modules())
    before = copy.deepcopy(model.state_dict())
    result = export_model(model, None, tmp_path / "art", formats=["onnx"], trace_length=TRACE)
    assert result.parity.passed and max(result.parity.worst().values()) < 1e-5
    assert all(isinstance(m, (nn.LSTM, nn.GRU, nn.TransformerEncoder)) for m in model.modules()
               if type(m).__name__ in ("LSTM", "GRU", "TransformerEncoder")), "the model itself is untouched"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class TorchTagger(nn.Module):
    """A user model of plain torch.nn layers (no seqfuse, no export plan)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.gru = nn.GRU(8, 10, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(20, 4)

    def forward(self, input_ids):
        out, _ = self.gru(self.emb(input_ids))
        return self.fc(out)


def test_a_plain_torch_nn_model_exports_with_example_inputs(tmp_path):
    torch.manual_seed(0)
    model = TorchTagger().eval()
    example = (torch.randint(0, 20, (2, 7)),)
    result = export_model(model, example, tmp_path / "art", input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes=[{0: "batch", 1: "time"}], trace_length=TRACE)
    assert result.parity.passed
    assert {r.case for r in result.parity.rows} >= {"b=8 t=12", "b=1 t=1"}
    assert result.manifest["parts"]["model"]["outputs"][0]["dims"] == ["batch", 7, 4]


class _ValidLensAttention(nn.Module):
    """A d2l-style use of seqfuse's AdditiveAttention: valid_lens counts the keys."""

    def __init__(self):
        super().__init__()
        import seqfuse

        self.attention = seqfuse.nn.AdditiveAttention(key_size=4, query_size=5, num_hiddens=6)

    def forward(self, queries, keys, values, valid_lens):
        return self.attention(queries, keys, values, valid_lens)


def test_parity_inputs_keep_valid_lens_within_the_key_axis(tmp_path):
    """Issue 23: an integer input that counts the time axis but is not named lengths was
    drawn from the example's [min, max] whatever the new key length ("valid_lens must be
    <= K=1"); now it is drawn in [1, K] at every generated K."""
    torch.manual_seed(0)
    model = _ValidLensAttention().eval()
    example = (torch.randn(2, 3, 5), torch.randn(2, 6, 4), torch.randn(2, 6, 7), torch.tensor([6, 4]))
    result = export_model(model, example, tmp_path / "art", formats=("onnx",),
                          input_names=["queries", "keys", "values", "valid_lens"],
                          output_names=["context"],
                          dynamic_axes=[{0: "batch"}, {0: "batch", 1: "time"}, {0: "batch", 1: "time"},
                                        {0: "batch"}], trace_length=TRACE)
    assert result.parity.passed
    assert "b=1 t=1" in {r.case for r in result.parity.rows}


class _PythonLoop(nn.Module):
    """A loop over time in Python: torch.export fixes the time axis to the example's."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(3, 4)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 4)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return h


@pytest.mark.parametrize("fmt,match", [
    ("onnx", r"fixed axis 1 \('time'\) of input 'x' to 7"),
    ("aoti", r"fixed a dimension that dynamic_axes declares dynamic .*constant \(7\)"),
])
def test_an_axis_the_model_fixes_is_an_export_error_naming_it(fmt, match, tmp_path):
    """Issue 23: a raw onnxruntime 'INVALID_ARGUMENT ... Expected: 7' at parity time (ONNX),
    a bare 'Constraints violated (time)' (torch.export) before; now an ExportError that
    names the axis, says why and what to do, and leaves nothing on disk."""
    with pytest.raises(ExportError, match=match) as exc:
        export_model(_PythonLoop().eval(), (torch.randn(2, 7, 3),), tmp_path / "art", formats=(fmt,),
                     input_names=["x"], output_names=["h"], dynamic_axes=[{0: "batch", 1: "time"}])
    assert "declare the axis static" in str(exc.value)
    assert not (tmp_path / "art").exists()


def test_a_model_without_a_plan_needs_example_inputs(tmp_path):
    with pytest.raises(TypeError, match="no export plan for TorchTagger"):
        export_model(TorchTagger(), None, tmp_path / "art")
    with pytest.raises(ValueError, match="needs example_inputs"):
        export_model(TorchTagger(), None, tmp_path / "art", input_names=["input_ids"])
    assert not (tmp_path / "art").exists()


def test_real_heldout_inputs_join_the_parity_cases(tmp_path):
    model = build("lstm-tagger")
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]])
    result = export_model(model, None, tmp_path / "art", formats=["onnx"], heldout=[(ids, torch.tensor([4, 2]))],
                          trace_length=TRACE)
    assert "real[0] b=2 t=4" in {r.case for r in result.parity.rows}


def test_opset_23_exports_attention_as_the_onnx_attention_op(tmp_path):
    model = build("transformer-classifier")
    result = export_model(model, None, tmp_path / "art", formats=["onnx"], opset=23, trace_length=TRACE)
    proto = onnx.load(str(result.out_dir / "model.onnx"))
    assert "Attention" in {n.op_type for n in proto.graph.node}
    assert result.parity.passed and result.manifest["opset"] == 23


# -- failure paths ----------------------------------------------------------------------

@torch.library.custom_op("seqfuse_test::double_it", mutates_args=())
def double_it(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@double_it.register_fake
def _(x):
    return torch.empty_like(x)


class NoTranslation(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(double_it(x))


def test_an_op_with_no_onnx_translation_is_a_clear_error_leaving_nothing(tmp_path):
    model = NoTranslation().eval()
    with pytest.raises(ExportError, match="to onnx failed"):
        export_model(model, (torch.randn(2, 5, 3),), tmp_path / "art", input_names=["x"], output_names=["y"],
                     dynamic_axes=[{0: "batch", 1: "time"}], formats=["onnx"])
    assert list(tmp_path.iterdir()) == []


def test_failed_parity_keeps_the_previous_artifact_and_leaves_no_temporary_folder(tmp_path):
    model = build("lstm-classifier")
    out = tmp_path / "a"
    export_model(model, None, out, formats=["onnx"], trace_length=TRACE)
    before = (out / "manifest.json").read_text()
    with pytest.raises(ParityError) as exc:
        export_model(model, None, out, formats=["onnx", "pt2"], atol=1e-30, trace_length=TRACE)
    assert "parity failed" in str(exc.value) and "NO" in str(exc.value)
    assert not exc.value.report.passed
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"], "no temporary folder left behind"


def test_a_parity_failure_of_one_format_is_caught(tmp_path, monkeypatch):
    """A format that computes something else (here: TorchScript traced from a model with
    a perturbed weight) fails the suite, while the others pass."""
    import seqfuse.export.exporter as exporter

    model = build("bilstm-classifier")
    real_trace = exporter.export_torchscript

    def perturbed(module, example, path):
        bad = copy.deepcopy(module)
        with torch.no_grad():
            bad.fc.bias.add_(1e-3)
        return real_trace(bad, example, path)

    monkeypatch.setattr(exporter, "export_torchscript", perturbed)
    with pytest.raises(ParityError) as exc:
        export_model(model, None, tmp_path / "art", trace_length=TRACE)
    failed = {r.format for r in exc.value.report.rows if not r.passed}
    assert failed == {"torchscript"}
    assert not (tmp_path / "art").exists()


def test_an_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    # refused before the export starts (seqfuse.atomic.check_destination), naming the path
    with pytest.raises(ValueError, match=r"out_dir: .*file/art cannot be created: .*file is not a folder"):
        export_model(build("lstm-rows"), None, blocker / "art", formats=["onnx"])
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("kwargs, match", [
    (dict(formats=["onnx", "tflite"]), "formats must be"),
    (dict(formats=[]), "formats must be"),
    (dict(variants=["int4"]), "variants must be"),
    (dict(formats=["torchscript"], variants=["fp16"]), "must include 'onnx'"),
    (dict(opset=11), "opset must be"),
    (dict(atol=0.0), "atol must be"),
    (dict(trace_length=1), "trace_length must be"),
])
def test_bad_arguments_name_the_argument(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        export_model(build("lstm-rows"), None, tmp_path / "art", **kwargs)
    assert list(tmp_path.iterdir()) == []
