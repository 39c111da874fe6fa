"""Writes that are whole or absent: a crash never leaves a half-written ticket, summary or export behind.

Files are written to a temporary sibling and renamed; directories are built in a temporary sibling directory and
renamed into place (``rename`` is atomic on POSIX file systems). Tests kill the process at the worst moment via
:func:`earlybert_ds.faults.fault_point`.

What is written gets the modes the umask allows, as ``open`` and ``mkdir`` give: not the private 0600/0700 of
``tempfile``'s temporaries, nor of files that libraries write through temporaries of their own (safetensors 0.8
writes every ``.safetensors`` file 0600), so that a finished run on shared storage is readable by the team.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .faults import fault_point


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o077)  # read by setting it: for that instant, anything created elsewhere is private
    os.umask(mask)
    return mask


def _open_modes(root: Path) -> None:
    """``root`` and everything in it get the modes the umask allows (executables stay executable)."""
    mask = _umask()
    for d, _, files in os.walk(root):
        os.chmod(d, 0o777 & ~mask)
        for f in files:
            p = os.path.join(d, f)
            if not os.path.islink(p):
                os.chmod(p, (0o777 if os.stat(p).st_mode & 0o111 else 0o666) & ~mask)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed (one writer per path)
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            fault_point(f"write:{path.name}")
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` in one rename (an older ``path`` is removed
    only after the new one is in place). On error or crash ``path`` is untouched; stale temporaries are named
    ``.NAME.tmp-*``, ignored by every reader and removed by the next writer (one writer per path: rank 0).
    ``replace=False`` is for caches that several nodes may build at once on shared storage: the first one to
    finish wins, and nobody deletes a directory that another node's ranks are reading."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*") if replace else ():  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        _open_modes(tmp)
        fault_point(f"dir:{path.name}")
        if not replace and path.exists():  # a cache another writer finished first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
