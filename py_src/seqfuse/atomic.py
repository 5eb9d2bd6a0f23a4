"""Publishing folders atomically: checkpoints (seqfuse.zoo.train), export artifacts
(seqfuse.export.exporter) and Triton model folders (seqfuse.export.triton) are built in a
temporary folder beside their destination and swapped in, so that the destination always
names a complete folder, the previous or the new one, whenever the process is killed.

Where the destination exists, Linux's renameat2(RENAME_EXCHANGE) exchanges the two
folders in one step; elsewhere the previous folder is moved aside first and put back if
the second rename fails (a kill between the two renames leaves it aside: the exporter's
next run restores it).
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
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
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
    os.rename(dest, old)
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
