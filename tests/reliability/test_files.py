"""Reliability of the files seqfuse writes and reads: checkpoints and export artifacts.

- Checkpoints never unpickle code: a legacy model.pt whose pickle would run a command is
  refused (torch.load(weights_only=True)) and the command does not run.
- A truncated, corrupted or inconsistent checkpoint file (config.json, model.safetensors,
  model.pt, metrics.json) or artifact file (manifest.json, model.onnx, vocab.json) is a
  ValueError naming the file, and one line with a non-zero exit code on the command line.
- `seqfuse predict` checks every file it loads against the manifest's sha256 first.
- An export killed at any point (SIGKILL: right before the swap, between the two renames
  of the fallback swap, after the swap, at random moments) leaves the artifact folder
  complete (the previous artifact, or the new one once swapped in), and the next export
  restores a set-aside previous artifact and removes what the killed one left behind.
"""
from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import requires_native

from seqfuse.cli import main
from seqfuse.zoo.data import Vocab
from seqfuse.export import load_runner
from seqfuse.export import exporter as E
from seqfuse.zoo.predict import Predictor
from seqfuse.export.runtime import ArtifactError, OrtModel, read_manifest, verify_artifact
from seqfuse.zoo.export import export_checkpoint
from seqfuse.zoo.models import MODELS
from seqfuse.zoo.train import (LEGACY_WEIGHTS, WEIGHTS, CheckpointError, CheckpointShapeError, load_checkpoint,
                           load_vocab, save_checkpoint)

NAME = "bilstm-classifier"
CONFIG = dict(vocab_size=20, embed_dim=8, hidden_size=8, num_classes=2)
VOCAB = Vocab(["<pad>", "<unk>"] + [f"w{i}" for i in range(18)])
TEXTS = ["w1 w2 w3", "w4 hello"]


def make_checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = MODELS[NAME](**CONFIG)
    return save_checkpoint(model, NAME, VOCAB, path, metrics={"test": {"accuracy": 0.5}})


def export(ckpt: Path, out: Path, **kw):
    return export_checkpoint(ckpt, out, formats=["onnx"], use_data=False, **kw)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def assert_complete(art: Path) -> dict:
    """Every file the manifest lists is there with its sha256, nothing else, and it serves."""
    manifest = read_manifest(art)
    assert sorted(manifest["files"]) == sorted(p.name for p in art.iterdir() if p.name != "manifest.json")
    verify_artifact(art, list(manifest["files"]), manifest)
    rows = Predictor(art)(TEXTS)
    assert [r["input"] for r in rows] == TEXTS and {r["label"] for r in rows} <= {"rotten", "fresh"}
    return manifest


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoints of the same model with different weights."""
    root = tmp_path_factory.mktemp("checkpoints")
    return make_checkpoint(root / "ckpt-a", 0), make_checkpoint(root / "ckpt-b", 1)


@pytest.fixture(scope="module")
def artifact(checkpoints, tmp_path_factory):
    """The artifact exported from the first checkpoint."""
    art = tmp_path_factory.mktemp("artifact") / "art"
    export(checkpoints[0], art)
    return art


@pytest.fixture
def ckpt(checkpoints, tmp_path):
    return Path(shutil.copytree(checkpoints[0], tmp_path / "ckpt"))


@pytest.fixture
def art(artifact, tmp_path):
    return Path(shutil.copytree(artifact, tmp_path / "art"))


def cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


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


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


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


# -- artifacts: manifest sha256 checked before loading -----------------------------------

def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


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
])
def test_predict_verifies_every_file_it_loads_against_the_manifest(art, damage, match, capsys):
    damage(art)
    with pytest.raises(ValueError, match=match):
        Predictor(art)
    code, err = cli(capsys, "predict", art, "w1 w2")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
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


@requires_native
def test_load_runner_verifies_published_files_and_names_corrupted_archives(art, tmp_path):
    assert load_runner("onnx", art / "model.onnx") is not None
    _flip_byte(art / "model.onnx")
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_runner("onnx", art / "model.onnx")
    loose = tmp_path / "loose"  # no manifest: an export in progress, nothing to verify against
    loose.mkdir()
    for fmt, suffix in (("torchscript", ".ts"), ("pt2", ".pt2")):
        (loose / f"model{suffix}").write_bytes(os.urandom(1000))
        with pytest.raises(ArtifactError, match=rf"model\{suffix}: cannot load this {fmt} file"):
            load_runner(fmt, loose / f"model{suffix}")
        with pytest.raises(FileNotFoundError, match="no manifest.json"):
            load_runner(fmt, loose / f"model{suffix}", verify=True)


# -- atomic export ----------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, time
    mode, ckpt, out = sys.argv[1:4]
    import seqfuse.export.exporter as E
    from seqfuse.zoo.export import export_checkpoint

    def pause():
        print("PAUSED", flush=True)
        time.sleep(600)

    if mode == "before-publish":
        E._publish = lambda tmp, out_dir: pause()
    elif mode == "after-exchange":
        exchange = E._exchange
        E._exchange = lambda a, b: (exchange(a, b) or sys.exit("no renameat2")) and pause()
    elif mode == "between-renames":      # the fallback swap: no renameat2
        move_aside = E._move_aside
        E._exchange = lambda a, b: False
        E._move_aside = lambda out_dir: (move_aside(out_dir), pause())
    print("EXPORTING", flush=True)
    export_checkpoint(ckpt, out, formats=["onnx"], use_data=False)
    print("DONE", flush=True)
""")


def spawn(tmp_path: Path, mode: str, ckpt: Path, out: Path) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "child.stderr", "wb") as err:
        return subprocess.Popen([sys.executable, str(script), mode, str(ckpt), str(out)],
                                stdout=subprocess.PIPE, stderr=err, env=env)


def wait_for(proc: subprocess.Popen, word: str, tmp_path: Path, timeout: float = 180) -> None:
    """Until the child prints `word` on a line of its own."""
    deadline, seen = time.monotonic() + timeout, b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            chunk = os.read(fd, 4096)
            seen += chunk
            if f"{word}\n".encode() in seen:
                return
            if not chunk:  # EOF: the child ended
                break
    kill(proc)
    err = (tmp_path / "child.stderr").read_text(errors="replace")[-3000:]
    raise AssertionError(f"the child did not print {word} (rc {proc.returncode}): {seen!r}\n{err}")


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()


@pytest.fixture
def published(checkpoints, artifact, tmp_path):
    """(previous artifact folder, its files, the checkpoint of a different model)."""
    out = Path(shutil.copytree(artifact, tmp_path / "out" / "art"))
    return out, files_of(out), checkpoints[1]


def _next_export_cleans_up(out: Path, ckpt: Path) -> None:
    export(ckpt, out)
    assert leftovers(out) == [], "the next export removes what the killed one left"
    assert_complete(out)


@requires_native
def test_killed_right_before_the_swap_leaves_the_previous_artifact(published, tmp_path):
    out, previous, new_ckpt = published
    proc = spawn(tmp_path, "before-publish", new_ckpt, out)
    wait_for(proc, "PAUSED", tmp_path)
    left = leftovers(out)
    assert len(left) == 1 and left[0].startswith(".art.tmp-")
    assert (out.parent / left[0] / "manifest.json").is_file(), "the new artifact was complete"
    kill(proc)
    assert files_of(out) == previous
    assert_complete(out)
    _next_export_cleans_up(out, new_ckpt)
    assert files_of(out)["model.onnx"] != previous["model.onnx"]


@requires_native
def test_killed_after_the_swap_leaves_the_new_artifact(published, tmp_path):
    out, previous, new_ckpt = published
    proc = spawn(tmp_path, "after-exchange", new_ckpt, out)
    wait_for(proc, "PAUSED", tmp_path)
    kill(proc)
    assert files_of(out)["model.onnx"] != previous["model.onnx"]
    assert_complete(out)
    (left,) = leftovers(out)
    assert files_of(out.parent / left) == previous, "the previous artifact, not yet removed"
    _next_export_cleans_up(out, new_ckpt)


@requires_native
def test_killed_between_the_renames_of_the_fallback_swap(published, tmp_path, capsys):
    out, previous, new_ckpt = published
    proc = spawn(tmp_path, "between-renames", new_ckpt, out)
    wait_for(proc, "PAUSED", tmp_path)
    kill(proc)
    assert not out.exists()
    (old,) = [n for n in leftovers(out) if n.startswith(".art.old-")]
    assert files_of(out.parent / old) == previous
    with pytest.raises(FileNotFoundError, match=rf"interrupted export set the previous artifact aside as .*{old}"):
        Predictor(out)
    code, err = cli(capsys, "predict", out, "w1")
    assert code == 2 and old in err and err.count("\n") == 1
    with pytest.warns(RuntimeWarning, match="restored the previous artifact"):
        E._recover(out)
    assert files_of(out) == previous and leftovers(out) == []
    assert_complete(out)
    _next_export_cleans_up(out, new_ckpt)


@requires_native
def test_the_fallback_swap_publishes_when_renameat2_is_unavailable(published, monkeypatch):
    out, previous, new_ckpt = published
    monkeypatch.setattr(E, "_exchange", lambda a, b: False)
    export(new_ckpt, out)
    assert files_of(out)["model.onnx"] != previous["model.onnx"] and leftovers(out) == []
    assert_complete(out)


@requires_native
def test_killed_at_random_moments_the_folder_is_always_a_complete_artifact(published, tmp_path):
    out, _, new_ckpt = published
    previous_rows = Predictor(out)(TEXTS)
    t0 = time.monotonic()
    export(new_ckpt, tmp_path / "scratch")  # how long an export takes here (a fresh process: more)
    span = 2 * (time.monotonic() - t0)
    served = []
    for delay in sorted(random.Random(0).uniform(0, span) for _ in range(3)):
        proc = spawn(tmp_path, "plain", new_ckpt, out)
        wait_for(proc, "EXPORTING", tmp_path)  # imports done: the export starts
        time.sleep(delay)
        kill(proc)
        assert_complete(out)  # the previous artifact, or the new one once swapped in
        served.append(Predictor(out)(TEXTS))
    _next_export_cleans_up(out, new_ckpt)
    new_rows = Predictor(out)(TEXTS)
    assert new_rows != previous_rows
    assert all(rows in (previous_rows, new_rows) for rows in served)


@requires_native
def test_the_next_export_removes_only_leftovers_whose_export_is_gone(published):
    out, _, new_ckpt = published
    done = subprocess.Popen(["true"])
    done.wait()
    kept = [out.with_name(E.owned_prefix(out, "tmp") + "live"),  # this process: in progress
            out.with_name(".art.tmp-otherhost.1-x")]  # another host, recent: cannot tell
    removed = [out.with_name(E.owned_prefix(out, "tmp").replace(f".{os.getpid()}-", f".{done.pid}-") + "x"),
               out.with_name(f".art.old-{done.pid}"),  # the name older versions gave
               out.with_name(".art.tmp-oldstyle")]  # no owner in the name, but a day old
    for path in kept + removed:
        path.mkdir()
    day_and_more = time.time() - 25 * 3600
    os.utime(removed[-1], (day_and_more, day_and_more))
    export(new_ckpt, out)
    assert all(p.is_dir() for p in kept)
    assert not any(p.exists() for p in removed)
    assert_complete(out)
