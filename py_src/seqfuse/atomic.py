"""Publishing folders atomically: checkpoints (seqfuse.zoo.train), export artifacts
(seqfuse.export.exporter) and Triton model folders (seqfuse.export.triton) are built in a
temporary folder beside their destination and swapped in, so that the destination always
names a complete folder, the previous or the new one, whenever the process is killed.

Where the destination exists, Linux's renameat2(RENAME_EXCHANGE) exchanges the two
folders in one step; elsewhere the previous folder is moved aside first and put back if
the second rename fails (a kill between the two renames leaves it aside: the exporter's
next run restores it).

Before a folder is replaced, `check_destination` decides whether it may be: only a
folder that does not exist, is empty, or is a previous output of the same command (its
`is_previous` test: only files that command writes, and its marker file parses), or any
folder with force. Never, even with force: a symbolic link (the link would be replaced,
not the folder it names: give the folder itself), a file, a path inside a file, the
current folder or one of its parents, a mount point, or a folder that is, or holds, an
input being read. Commands check every destination before they start work, and again
right before the swap.

The temporary (`.{name}.tmp-{host}.{pid}-XXXX`) and set-aside (`.{name}.old-...`)
siblings name their host and process: `recover`, run before each write of the same
destination, puts a set-aside folder back when the destination is missing and removes
the siblings whose process is gone (or that are older than STALE_SECONDS when the owner
cannot be checked), and nothing else.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Callable

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_renameat2: Callable | bool | None = None   # looked up once: the libc function, or False


def rename_exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically exchange two existing paths (Linux renameat2 with RENAME_EXCHANGE, glibc
    >= 2.28). False where that is unavailable (other systems, an old kernel or C library,
    a file system without support): the caller falls back to two renames. Other failures
    raise OSError."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = False
        _renameat2 = fn
    if not _renameat2:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


# -- the siblings a write leaves next to its destination --------------------------------

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
STALE_SECONDS = 24 * 3600  # a leftover whose owner cannot be checked is removed after this


def owned_prefix(dest: Path, kind: str) -> str:
    """The name prefix of a temporary ("tmp") or set-aside ("old") sibling of `dest`,
    naming this host and process."""
    return f".{Path(dest).name}.{kind}-{_HOST}.{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def siblings(dest: Path, kind: str) -> list[tuple[Path, bool]]:
    """(path, stale) for each `.{name}.{kind}-*` next to `dest`; stale: its process (on
    this host) is gone, or it is older than STALE_SECONDS (another host, an older name)."""
    dest = Path(dest)
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.{kind}-(?:(?P<host>[A-Za-z0-9]+)\.)?(?P<pid>\d+)(?:-|$)")
    prefix = f".{dest.name}.{kind}-"
    out = []
    try:
        entries = list(dest.parent.iterdir())
    except OSError:
        return []
    for path in entries:
        if not path.name.startswith(prefix):
            continue
        m = pattern.match(path.name)
        try:
            age = time.time() - path.lstat().st_mtime
        except OSError:
            continue
        stale = age > STALE_SECONDS
        if m and (m["host"] or _HOST) == _HOST:
            stale = stale or not _pid_alive(int(m["pid"]))
        out.append((path, stale))
    return out


def recover(dest: Path) -> None:
    """Before writing `dest`: undo what a killed write of it left. A missing `dest` with a
    set-aside previous folder next to it gets it back; temporary and set-aside siblings
    whose process is gone are removed."""
    dest = Path(dest)
    if not (dest.exists() or dest.is_symlink()):
        previous = [p for p, stale in siblings(dest, "old") if stale and p.is_dir() and not p.is_symlink()]
        if previous:
            latest = max(previous, key=lambda p: p.lstat().st_ctime)
            os.replace(latest, dest)
            warnings.warn(f"{dest}: restored the previous folder from {latest.name}, set aside by "
                          "a write that was interrupted", RuntimeWarning, stacklevel=3)
    for kind in ("tmp", "old"):
        for path, stale in siblings(dest, kind):
            if stale:
                remove_path(path)


# -- which destinations may be replaced ------------------------------------------------


class DestinationError(ValueError):
    """A destination a command must not write. `label` names the argument (`out_dir`;
    the command line maps it to its option), `path` the destination; `overridable`: force
    would allow it (an existing folder that is not a previous output)."""

    def __init__(self, label: str, path: Path, reason: str, overridable: bool = False):
        self.label, self.path, self.reason, self.overridable = label, Path(path), reason, overridable
        super().__init__(self.message())

    def message(self, label: str | None = None, force: str = "force=True") -> str:
        """One line: `label: path reason` (and how to force it, where that is allowed)."""
        text = f"{label or self.label}: {self.path} {self.reason}"
        return text + (f"; pass {force} to replace it" if self.overridable else "")


def check_folder(path: str | os.PathLike, *, label: str) -> Path:
    """A folder that will be created or written into: not a file, not inside a file, and
    its nearest existing folder writable. Returns the path; raises DestinationError."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise DestinationError(label, p, "exists and is not a folder")
    if p.is_symlink() and not p.exists():
        raise DestinationError(label, p, f"is a dangling symbolic link (to {os.readlink(p)})")
    if p.is_dir():
        return p
    ancestor = p.parent
    while not (ancestor.exists() or ancestor.is_symlink()) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DestinationError(label, p, f"cannot be created: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DestinationError(label, p, f"cannot be created: {ancestor} is not writable")
    return p


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_destination(dest: str | os.PathLike, *, label: str, what: str,
                      is_previous: Callable[[Path], bool], force: bool = False,
                      inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Raise DestinationError unless the folder `dest` may be replaced (module docstring):
    it does not exist, is empty, is a previous output (`is_previous(dest)`: a `what`),
    or `force`. inputs: the paths the command reads, which it must never replace.
    Returns `dest` as a Path."""
    p = Path(dest)
    if p.is_symlink():
        raise DestinationError(label, p, f"is a symbolic link (to {os.readlink(p)}): the link would be "
                                         "replaced, not its folder; give the folder itself")
    check_folder(p, label=label)
    where = p.resolve()
    cwd = Path.cwd().resolve()
    if _within(cwd, where):
        raise DestinationError(label, p, "is the current folder or one of its parents: give a folder "
                                         "of its own")
    if p.is_dir() and os.path.ismount(p):
        raise DestinationError(label, p, "is a mount point: give a folder inside it")
    for item in inputs:
        source = Path(item).resolve()
        if _within(source, where):
            relation = "is" if source == where else "holds"
            raise DestinationError(label, p, f"{relation} the input {item}, which this command reads")
    if not p.is_dir():
        return p
    try:
        entries = sorted(e.name for e in p.iterdir())
    except OSError as exc:
        raise DestinationError(label, p, f"cannot be listed ({exc.strerror})") from exc
    if not entries or force or is_previous(p):
        return p
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    raise DestinationError(label, p, f"exists and is not {what} (it holds {shown}): give a new or "
                                     "empty folder", overridable=True)


def only_regular_files(folder: Path, allowed: Callable[[str], bool]) -> bool:
    """Every entry of `folder` is a regular file (no link, no folder) whose name is allowed:
    the first half of an `is_previous` test."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    return all(e.is_file(follow_symlinks=False) and allowed(e.name) for e in entries)


# -- reading input files for publishing --------------------------------------------------


def open_regular(path: str | os.PathLike):
    """Open `path` for reading in binary, refusing a symbolic link (O_NOFOLLOW) and
    anything that is not a regular file: a published copy holds the file named, never
    the target of a link someone put in its place. Raises ValueError naming it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(path):
            raise ValueError(f"{path} is a symbolic link: refusing to publish what it points to") from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file: refusing to publish it")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def copy_regular_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the regular file `src` (open_regular: no link followed) to the new file `dst`."""
    with open_regular(src) as f, open(dst, "xb") as out:
        shutil.copyfileobj(f, out)


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh folder in `parent` with the permissions a plain mkdir would give (mkdtemp's
    0700 would make the published folder private)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    return path


def remove_path(path: Path) -> None:
    """Remove a folder (or a file or link left where one was), ignoring errors."""
    if path.is_symlink() or path.is_file():
        try:
            path.unlink()
        except OSError:
            pass
    else:
        shutil.rmtree(path, ignore_errors=True)


def sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """fsync every file of `folder` (recursively) and the folders: after a crash, the
    renamed folder holds the data, not empty files."""
    for p in folder.iterdir():
        if p.is_dir() and not p.is_symlink():
            sync_tree(p)
        elif p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    sync_dir(folder)


def _aside(dest: Path) -> Path:
    old = dest.with_name(owned_prefix(dest, "old") + os.urandom(4).hex())
    os.rename(dest, old)  # a fresh name: nothing there to replace
    return old


def swap_in(tmp: Path, dest: Path, *, exchange: Callable[[Path, Path], bool] = rename_exchange,
            move_aside: Callable[[Path], Path] = _aside, sync: bool = False) -> None:
    """Put the finished folder `tmp` at `dest` (see the module docstring); the previous
    folder is removed after. sync: fsync the files and folders first."""
    if sync:
        sync_tree(tmp)
    if not (dest.exists() or dest.is_symlink()):
        os.replace(tmp, dest)
    elif exchange(tmp, dest):
        if sync:
            sync_dir(dest.parent)
        remove_path(tmp)  # the previous folder
        return
    else:
        old = move_aside(dest)
        try:
            os.replace(tmp, dest)
        except BaseException:
            os.replace(old, dest)  # put the previous folder back
            raise
        if sync:
            sync_dir(dest.parent)
        remove_path(old)
        return
    if sync:
        sync_dir(dest.parent)
