"""Reliability of the checkpoints `seqfuse train` writes and `seqfuse evaluate` reads.

- Checkpoints never unpickle code: a legacy model.pt whose pickle would run a command is
  refused (torch.load(weights_only=True)) and the command does not run.
- A truncated, corrupted or inconsistent checkpoint file (config.json, model.safetensors,
  model.pt, metrics.json, vocab.json) is a ValueError naming the file, and one line with a
  non-zero exit code on the command line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from seqfuse.cli import main
from seqfuse.zoo.train import (
    LEGACY_WEIGHTS,
    WEIGHTS,
    CheckpointError,
    CheckpointShapeError,
    load_checkpoint,
    load_vocab,
)

from .files_common import VOCAB, _truncate, cli

# -- checkpoints ------------------------------------------------------------------------


def test_a_legacy_pickle_that_would_run_code_is_refused_and_does_not_run(ckpt, tmp_path):
    marker = tmp_path / "MARKER"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / WEIGHTS).unlink()
    torch.save({"embedding.weight": Exploit()}, ckpt / LEGACY_WEIGHTS)
    with pytest.raises(CheckpointError, match=r"model\.pt.*refusing to unpickle"):
        load_checkpoint(ckpt)
    assert not marker.exists(), "the pickle's code ran"
    assert main(["evaluate", str(ckpt)]) == 2
    assert not marker.exists()


def test_a_legacy_state_dict_still_loads_and_a_truncated_one_is_named(ckpt):
    model, name, _ = load_checkpoint(ckpt)
    state = model.state_dict()
    (ckpt / WEIGHTS).unlink()
    torch.save(state, ckpt / LEGACY_WEIGHTS)
    loaded, loaded_name, _ = load_checkpoint(ckpt)
    assert loaded_name == name and all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    data = (ckpt / LEGACY_WEIGHTS).read_bytes()
    (ckpt / LEGACY_WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.pt is not a readable torch\.save file"):
        load_checkpoint(ckpt)
    torch.save([1, 2, 3], ckpt / LEGACY_WEIGHTS)  # unpickles fine, but is no state_dict
    with pytest.raises(CheckpointError, match=r"model\.pt does not hold a state_dict"):
        load_checkpoint(ckpt)


def _edit_config(ckpt: Path, edit) -> None:
    meta = json.loads((ckpt / "config.json").read_text())
    edit(meta)
    (ckpt / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, match", [
    (lambda c: _truncate(c / "config.json"), r"config\.json is not valid JSON \(truncated"),
    (lambda c: (c / "config.json").write_bytes(os.urandom(300) + b"\xff"), r"config\.json is not"),
    (lambda c: (c / "config.json").write_text("[1, 2]"), r"config\.json must hold a JSON object"),
    (lambda c: _edit_config(c, lambda m: m.update(model="no-such-model")), r"config\.json names model 'no-such"),
    (lambda c: _edit_config(c, lambda m: m.pop("config")), r"config\.json has no 'config' key"),
    (lambda c: _edit_config(c, lambda m: m.pop("model")), r"config\.json has no 'model' key"),
    (lambda c: _edit_config(c, lambda m: m["config"].update(hidden_size="big")), r"config\.json: cannot build"),
    (lambda c: _edit_config(c, lambda m: m.update(vocabs=["../../etc/passwd"])), r"'vocabs' must list file"),
    (lambda c: _truncate(c / WEIGHTS), r"model\.safetensors is not a readable safetensors file"),
    (lambda c: (c / WEIGHTS).write_bytes(os.urandom(4096)), r"model\.safetensors is not a readable"),
    (lambda c: (c / WEIGHTS).write_bytes(b""), r"model\.safetensors is not a readable"),
    (lambda c: _truncate(c / "metrics.json", 0.7), r"metrics\.json is not valid JSON"),
    (lambda c: (c / "metrics.json").write_text('"just a string"'), r"metrics\.json must hold a JSON object"),
])
def test_a_damaged_checkpoint_file_is_a_value_error_naming_it(ckpt, damage, match, capsys):
    damage(ckpt)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(ckpt)
    code, err = cli(capsys, "evaluate", ckpt)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("seqfuse evaluate: ") and str(ckpt) in err


def test_weights_of_other_shapes_or_names_name_the_parameter(ckpt):
    from safetensors.torch import load_file, save_file

    _edit_config(ckpt, lambda m: m["config"].update(vocab_size=21))
    with pytest.raises(CheckpointShapeError, match=r"model\.safetensors: size mismatch for embedding\.weight: "
                                                    r"the file has shape \[20, 8\].* has \[21, 8\]"):
        load_checkpoint(ckpt)
    with pytest.raises(RuntimeError, match="size mismatch"):  # as torch's load_state_dict says it
        load_checkpoint(ckpt)
    _edit_config(ckpt, lambda m: m["config"].update(vocab_size=20))
    state = load_file(ckpt / WEIGHTS)
    state["fc.weights"] = state.pop("fc.weight")
    save_file(state, ckpt / WEIGHTS)
    with pytest.raises(CheckpointError, match=r"missing \['fc\.weight'\]; unexpected \['fc\.weights'\]"):
        load_checkpoint(ckpt)


def test_a_damaged_vocabulary_is_named(ckpt):
    assert load_vocab(ckpt / "vocab.json").itos == VOCAB.itos
    _truncate(ckpt / "vocab.json")
    with pytest.raises(CheckpointError, match=r"vocab\.json is not valid JSON"):
        load_vocab(ckpt / "vocab.json")
    (ckpt / "vocab.json").write_text('["<pad>", "a", "a"]')
    with pytest.raises(CheckpointError, match=r"vocab\.json lists a token twice"):
        load_vocab(ckpt / "vocab.json")
