"""Small helpers shared by the data modules and training: chunking an iterable, atomic file writes."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@contextlib.contextmanager
def staged(path: str | os.PathLike) -> Iterator[str]:
    """The one way lrkv writes a file: ``with staged(path) as tmp: write(tmp)``.

    The content is written to a hidden temporary name *beside* ``path`` (same filesystem, so the
    final ``os.replace`` is atomic: readers see the old file or the new one, never a partial one),
    then renamed over ``path``. On any failure the temporary file is removed. The file gets the mode
    of any newly created file (0666 minus the process umask), whatever the writer used, so teammates
    read outputs and the shared cache as the umask allows. A full disk, a permission error or a
    read-only folder becomes one line naming the path.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    tmp = staging_name(path)
    try:
        os.makedirs(directory, exist_ok=True)
        yield tmp
        if os.path.isfile(tmp) and not os.path.islink(tmp):  # some writers (safetensors) create files 0600
            os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as e:
        remove(tmp)
        raise_write_error(e, path)


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def staging_name(path: str | os.PathLike) -> str:
    """``dir/.name.<pid>.tmp``: beside the target, unique per process, hidden from globs."""
    path = os.fspath(path)
    return os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")


def remove(path: str | os.PathLike) -> None:
    """Remove a file, link or folder if it exists (cleanup never raises)."""
    import shutil

    try:
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


_WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the filesystem is read-only",
}


def write_error(e: BaseException, path: str | os.PathLike) -> BaseException:
    """``OutputError`` (one line naming the path and the fix) for a full disk, a permission error or a
    read-only folder; any other exception unchanged."""
    from lrkv.errors import OutputError

    if isinstance(e, OutputError) or not isinstance(e, OSError) or e.errno not in _WRITE_ERRORS:
        return e
    return OutputError(
        f"cannot write {os.fspath(path)}: {_WRITE_ERRORS[e.errno]}; "
        + ("free space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a writable folder")
        + " (paths.output_dir=... / paths.cache_dir=...)"
    )


def raise_write_error(e: BaseException, path) -> None:
    """Raise ``write_error(e, path)`` from ``e``, or ``e`` itself when it is not a write failure we name."""
    error = write_error(e, path)
    if error is e:
        raise e
    raise error from e


def atomic_write(path: str, data: bytes | str | np.ndarray) -> None:
    """Write a file atomically (see ``staged``)."""
    with staged(path) as tmp, open(tmp, "wb") as f:
        if isinstance(data, np.ndarray):
            data.tofile(f)
        else:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
