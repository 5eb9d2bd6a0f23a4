"""Reliability of the artifact folder `seqfuse export` publishes.

- An export killed at any point (SIGKILL: right before the swap, between the two renames
  of the fallback swap, after the swap, at random moments) leaves the artifact folder
  complete (the previous artifact, or the new one once swapped in), and the next export
  restores a set-aside previous artifact and removes what the killed one left behind.
- seqfuse.export.load_runner verifies the files it loads against the manifest, and names
  a corrupted TorchScript or torch.export archive.
- `--out` is replaced only when it is missing, empty or a previous artifact (only the
  files its manifest lists); another folder needs --force; the checkpoint being read, a
  folder holding it, the current folder or one of its parents, a symbolic link never.
  `--triton-repo` and its model folders are checked the same way, all before the export
  starts: a refusal leaves every previous output as it was.
- A vocabulary in the checkpoint that is a symbolic link is refused, not published.
"""
from __future__ import annotations

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

from conftest import requires_native
from seqfuse.export import exporter as E
from seqfuse.export import load_runner
from seqfuse.export.runtime import ArtifactError, read_manifest, verify_artifact
from seqfuse.zoo.predict import Predictor

from .files_common import NAME, TEXTS, _flip_byte, cli, export, refused, run, tree


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
    with pytest.warns(RuntimeWarning, match="restored the previous folder"):
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


# -- what --out and --triton-repo may replace ---------------------------------------------

EXPORT = ["--formats", "onnx", "--no-data", "--quiet"]


@requires_native
def test_export_refuses_a_folder_that_is_not_an_artifact_and_force_replaces_it(ckpt, tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "precious.txt").write_text("keep\n")
    code, err = cli(capsys, "export", ckpt, "--out", out, *EXPORT)
    refused(code, err, rf"^seqfuse export: --out: {out} exists and is not an artifact written by seqfuse "
                       r"export \(it holds precious\.txt\).*--force")
    assert tree(out) == {"precious.txt": b"keep\n"} and leftovers(out) == []
    code, err = cli(capsys, "export", ckpt, "--out", out, *EXPORT, "--force")
    assert code == 0, err
    assert not (out / "precious.txt").exists()
    assert_complete(out)
    code, err = cli(capsys, "export", ckpt, "--out", out, *EXPORT)  # a previous artifact: replaced
    assert code == 0, err
    (out / "notes.txt").write_text("added after export")  # now it holds a file export did not write
    code, err = cli(capsys, "export", ckpt, "--out", out, *EXPORT)
    refused(code, err, r"--out: .*d exists and is not an artifact written by seqfuse export")
    assert (out / "notes.txt").is_file()


@requires_native
def test_export_never_replaces_its_checkpoint_a_folder_holding_it_or_the_current_folder(ckpt, tmp_path, capsys):
    before = tree(tmp_path)
    for out, pattern in ((ckpt, r"--out: .*ckpt is the input .*ckpt, which this command reads"),
                         (tmp_path, r"--out: .* holds the input .*ckpt, which this command reads"),
                         (ckpt / ".." / "ckpt", r"is the input")):
        for force in ([], ["--force"]):
            code, err = cli(capsys, "export", ckpt, "--out", out, *EXPORT, *force)
            refused(code, err, pattern)
    assert tree(tmp_path) == before, "the checkpoint (weights, vocabulary) is intact"
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    code, err = cli(capsys, "export", ckpt, "--out", tmp_path / "link", *EXPORT, "--force")
    refused(code, err, r"--out: .*link is a symbolic link")
    code, _, err = run("export", ckpt, "--out", ".", *EXPORT, "--force", cwd=ckpt)
    refused(code, err, r"--out: \. is the current folder or one of its parents")
    assert tree(ckpt) == {k[len("ckpt/"):]: v for k, v in before.items() if k.startswith("ckpt/")}


@requires_native
def test_every_destination_is_checked_before_the_export_starts(ckpt, art, tmp_path, capsys):
    previous = tree(art)
    (tmp_path / "a-file").write_text("not a folder\n")
    repo = tmp_path / "repo"
    (repo / NAME).mkdir(parents=True)
    (repo / NAME / "notes.txt").write_text("someone else's model")
    for argv, pattern in (
            (["--triton-repo", tmp_path / "a-file"], r"--triton-repo: .*a-file exists and is not a folder"),
            (["--triton-repo", tmp_path / "a-file" / "r"], r"--triton-repo: .*a-file/r cannot be created"),
            (["--triton-repo", art / "triton"], r"--triton-repo: .*art/triton is inside the artifact folder"),
            (["--triton-repo", repo], rf"--triton-repo: .*repo/{NAME} exists and is not a Triton model folder "
                                      r"written by seqfuse .*--force"),
            (["--out", tmp_path / "a-file" / "x"], r"--out: .*a-file/x cannot be created: .*a-file is not a folder")):
        code, err = cli(capsys, "export", ckpt, "--out", art, *EXPORT, *argv)
        refused(code, err, pattern)
        assert tree(art) == previous, "the previous artifact was not replaced"
    assert (repo / NAME / "notes.txt").is_file()
    code, err = cli(capsys, "export", ckpt, "--out", art, *EXPORT, "--triton-repo", repo, "--force")
    assert code == 0, err
    assert sorted(p.name for p in (repo / NAME).iterdir()) == ["1", "config.pbtxt"]
    code, err = cli(capsys, "export", ckpt, "--out", art, *EXPORT, "--triton-repo", repo)  # ours now
    assert code == 0, err


@requires_native
def test_a_linked_vocabulary_is_refused_not_published(ckpt, tmp_path, capsys):
    secret = tmp_path / "secret.json"
    secret.write_text('["<pad>", "<unk>", "password"]')
    (ckpt / "vocab.json").unlink()
    (ckpt / "vocab.json").symlink_to(secret)
    out = tmp_path / "art"
    code, err = cli(capsys, "export", ckpt, "--out", out, *EXPORT)
    refused(code, err, r"vocab\.json is a symbolic link: refusing to publish")
    assert not out.exists() and leftovers(out) == []
