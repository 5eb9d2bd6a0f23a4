"""Reliability of the checkpoints `seqfuse train` writes and `seqfuse evaluate` reads.

- Checkpoints never unpickle code: a legacy model.pt whose pickle would run a command is
  refused (torch.load(weights_only=True)) and the command does not run.
- A truncated, corrupted or inconsistent checkpoint file (config.json, model.safetensors,
  model.pt, metrics.json, vocab.json) is a ValueError naming the file, and one line with a
  non-zero exit code on the command line.
- `--out` is replaced only when it is missing, empty or a previous checkpoint (only the
  files train writes, a config.json that reads); another folder needs --force; the current
  folder or one of its parents, a symbolic link, a path inside a file never. Each refusal
  comes before training, as one line naming the path.
- A save killed before its swap leaves a temporary sibling naming its process; the next
  save of that folder removes it (and only leftovers whose process is gone).
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from seqfuse.atomic import owned_prefix
from seqfuse.cli import main
from seqfuse.zoo.train import (
    LEGACY_WEIGHTS,
    WEIGHTS,
    CheckpointError,
    CheckpointShapeError,
    load_checkpoint,
    load_vocab,
)

from .files_common import VOCAB, _truncate, cli, make_checkpoint, refused, run, tree

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
    (lambda c: (c / "config.json").write_text("[" * 100_000 + "]" * 100_000), r"config\.json nests its JSON too deeply"),
    (lambda c: (c / "metrics.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000),
     r"metrics\.json nests its JSON too deeply"),
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


# -- what --out may replace ----------------------------------------------------------------

TRAIN = ["train", "lstm-regressor", "--epochs", "1", "--limit", "64"]  # about a second


def test_train_refuses_a_folder_that_is_not_a_checkpoint_before_training(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "precious.txt").write_text("keep\n")
    t0 = time.monotonic()
    code, err = cli(capsys, *TRAIN, "--out", out)
    refused(code, err, rf"^seqfuse train: --out: {out} exists and is not a checkpoint written by seqfuse "
                       r"train \(it holds precious\.txt\).*--force")
    assert time.monotonic() - t0 < 5, "refused before the data was loaded and the model trained"
    assert tree(out) == {"precious.txt": b"keep\n"}
    assert [p.name for p in tmp_path.iterdir()] == ["d"], "no temporary folder left"


def test_train_replaces_a_previous_checkpoint_an_empty_folder_and_with_force_any_folder(tmp_path, capsys):
    previous = make_checkpoint(tmp_path / "previous", 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (previous, empty):
        code, err = cli(capsys, *TRAIN, "--out", out)
        assert code == 0, err
        assert json.loads((out / "config.json").read_text())["model"] == "lstm-regressor"
    (previous / "notes.txt").write_text("mine")  # a checkpoint with a file train does not write
    code, err = cli(capsys, *TRAIN, "--out", previous)
    refused(code, err, r"--out: .*previous exists and is not a checkpoint written by seqfuse train")
    assert (previous / "notes.txt").read_text() == "mine"
    code, err = cli(capsys, *TRAIN, "--out", previous, "--force")
    assert code == 0, err
    assert not (previous / "notes.txt").exists() and (previous / "model.safetensors").is_file()


def test_train_refuses_a_link_a_path_inside_a_file_and_the_current_folder_even_with_force(tmp_path, capsys):
    target = make_checkpoint(tmp_path / "target", 0)
    before = tree(target)
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "a-file").write_text("not a folder\n")
    for out, pattern in ((tmp_path / "link", r"--out: .*link is a symbolic link \(to .*target\)"),
                         (tmp_path / "a-file" / "x", r"--out: .*a-file/x cannot be created: .*a-file is not a folder")):
        for force in ([], ["--force"]):
            code, err = cli(capsys, *TRAIN, "--out", out, *force)
            refused(code, err, pattern)
    assert tree(target) == before and (tmp_path / "link").is_symlink()
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("keep")
    for out in (".", "..", work, tmp_path):
        code, _, err = run(*TRAIN, "--out", out, "--force", cwd=work)
        refused(code, err, r"--out: .* is the current folder or one of its parents")
    assert (work / "keep.txt").read_text() == "keep"


SAVE_CHILD = textwrap.dedent("""
    import sys, time
    import torch
    from seqfuse.zoo.models import MODELS
    from seqfuse.zoo.train import save_checkpoint

    def pause(folder):
        print("PAUSED", flush=True)
        time.sleep(600)

    torch.manual_seed(1)
    model = MODELS["lstm-regressor"](num_features=5, hidden_size=4, num_layers=1, dropout=0.0)
    save_checkpoint(model, "lstm-regressor", {}, sys.argv[1], plot=pause)
""")


def test_a_save_killed_before_its_swap_leaves_a_leftover_the_next_save_removes(tmp_path):
    out = make_checkpoint(tmp_path / "ckpt", 0)
    before = tree(out)
    script = tmp_path / "child.py"
    script.write_text(SAVE_CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready and proc.stdout.readline() == b"PAUSED\n", "the child did not reach its save"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")]
    assert len(left) == 1 and left[0].startswith(f".ckpt.tmp-") and f".{proc.pid}-" in left[0], left
    assert tree(out) == before, "the previous checkpoint is intact"
    live = tmp_path / (owned_prefix(out, "tmp") + "live")  # this process: a save in progress
    unrelated = tmp_path / ".ckpt.notes"                      # not a name a save gives
    live.mkdir(), unrelated.mkdir()
    make_checkpoint(out, 1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")) == [".ckpt.notes",
                                                                                        live.name]
    assert tree(out) != before
