"""Reliability of the artifact files `seqfuse predict` loads: it checks every file it loads
(the graphs, the vocabularies) against the manifest's sha256 first, and a truncated or
corrupted model.onnx, vocab.json or manifest.json is a ValueError naming the file (one line
and a non-zero exit code on the command line), even with verification off. The manifest's
settings (serving: max_tokens, labels...; config; decoding) are covered by their own
sha256, and a serving section of the wrong types is named, not a traceback.
"""
from __future__ import annotations

import json
import os

import pytest

from conftest import requires_native
from seqfuse.export.runtime import ArtifactError, OrtModel, read_manifest, settings_sha256
from seqfuse.zoo.predict import Predictor

from .files_common import TEXTS, VOCAB, _flip_byte, _truncate, cli, refused

# -- artifacts: manifest sha256 checked before loading -----------------------------------


def _edit_manifest(art, edit, rehash: bool = False) -> None:
    manifest = json.loads((art / "manifest.json").read_text())
    edit(manifest)
    if rehash:
        manifest["settings_sha256"] = settings_sha256(manifest)
    (art / "manifest.json").write_text(json.dumps(manifest))


@requires_native
@pytest.mark.parametrize("damage, match", [
    (lambda a: _flip_byte(a / "model.onnx"), r"model\.onnx was modified after export: sha256 mismatch"),
    (lambda a: _truncate(a / "model.onnx"), r"model\.onnx was modified after export: sha256 mismatch"),
    (lambda a: (a / "model.onnx").unlink(), r"model\.onnx is missing"),
    (lambda a: (a / "vocab.json").write_text(json.dumps(VOCAB.itos[::-1])), r"vocab\.json was modified after "
                                                                           r"export: sha256 mismatch"),
    (lambda a: (a / "vocab.json").unlink(), r"vocab\.json is missing"),
    (lambda a: _truncate(a / "manifest.json"), r"manifest\.json is not valid JSON \(truncated"),
    (lambda a: (a / "manifest.json").write_text("{}"), r"manifest\.json has no 'parts' or 'files' section"),
    (lambda a: (a / "manifest.json").write_text(json.dumps(
        {k: v for k, v in json.loads((a / "manifest.json").read_text()).items() if k != "files"})),
     r"manifest\.json has no 'files' section"),
    (lambda a: (a / "manifest.json").write_text("[" * 100_000 + "]" * 100_000),
     r"manifest\.json nests its JSON too deeply"),
    (lambda a: _edit_manifest(a, lambda m: m["serving"].update(max_tokens=1)),
     r"manifest\.json: the 'serving' section was modified after export: sha256 mismatch"),
    (lambda a: _edit_manifest(a, lambda m: m["serving"].update(labels=["fresh", "rotten"])),
     r"manifest\.json: the 'serving' section was modified after export: sha256 mismatch"),
    (lambda a: _edit_manifest(a, lambda m: m["config"].update(num_classes=3)),
     r"manifest\.json: the 'config' section was modified after export"),
    (lambda a: _edit_manifest(a, lambda m: m.pop("settings_sha256")),
     r"manifest\.json has no 'settings_sha256'.*export it again"),
    # written so (the hashes agree): the types are checked
    (lambda a: _edit_manifest(a, lambda m: m["serving"].update(input=["text"]), rehash=True),
     r"manifest\.json: serving 'input' must be \"text\" or \"dense\", got \['text'\]"),
    (lambda a: _edit_manifest(a, lambda m: m["serving"].update(max_tokens="64"), rehash=True),
     r"manifest\.json: serving 'max_tokens' must be a positive integer, got '64'"),
    (lambda a: _edit_manifest(a, lambda m: m["serving"].update(labels="rotten fresh"), rehash=True),
     r"manifest\.json: serving 'labels' must be a non-empty list of strings"),
    (lambda a: _edit_manifest(a, lambda m: m["serving"].update(tokenizer={"words": 1}), rehash=True),
     r"manifest\.json: serving 'tokenizer' must be one of"),
])
def test_predict_verifies_every_file_it_loads_against_the_manifest(art, damage, match, capsys):
    damage(art)
    with pytest.raises(ValueError, match=match):
        Predictor(art)
    code, err = cli(capsys, "predict", art, "w1 w2")
    refused(code, err)
    assert err.startswith("seqfuse predict: ") and str(art) in err


@requires_native
def test_files_not_loaded_do_not_matter_and_the_served_model_is_the_exported_one(art):
    manifest = read_manifest(art)
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    before = Predictor(art)(TEXTS)
    (art / "notes.txt").write_text("added after export")  # not listed: never loaded, ignored
    assert Predictor(art)(TEXTS) == before


@requires_native
def test_without_verification_a_corrupted_onnx_file_is_still_a_clear_error(art):
    _truncate(art / "model.onnx")
    with pytest.raises(ArtifactError, match=r"model\.onnx: onnxruntime cannot load this ONNX file"):
        OrtModel.from_artifact(art, verify=False)
    (art / "model.onnx").write_bytes(os.urandom(2000))
    with pytest.raises(ArtifactError, match=r"model\.onnx: onnxruntime cannot load"):
        Predictor(art, verify=False)


@requires_native
def test_without_verification_a_corrupted_vocabulary_is_still_a_clear_error(art):
    _truncate(art / "vocab.json")
    with pytest.raises(ArtifactError, match=r"vocab\.json is not valid JSON"):
        Predictor(art, verify=False)
    (art / "vocab.json").write_text(json.dumps(VOCAB.itos + ["extra"]))
    with pytest.raises(ArtifactError, match=r"vocab\.json has 21 tokens, the model was exported with 20"):
        Predictor(art, verify=False)
