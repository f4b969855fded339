"""One run per folder: a running run holds an exclusive lock on `<run folder>/.lock`.

The lock is an `flock` on the file, which the operating system releases when the process ends, however
it ends (kill -9 included). The file itself records who holds it (pid, host, start time) and is
emptied on a clean exit, so a non-empty file whose lock is free is a *stale* lock left by a killed
run: it is taken over (with a note) and resuming works. A second run on a held folder fails at once
with one line naming the holder.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from lrkv.errors import OutputError

LOCK_FILE = ".lock"
log = logging.getLogger("lrkv")


def process_rank() -> int:
    """This process's global rank from the launcher's environment (0 when launched alone)."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit() and (var != "SLURM_PROCID" or int(os.environ.get("SLURM_NTASKS", 1)) > 1):
            return int(os.environ[var])
    return max(int(os.environ.get("LOCAL_RANK", 0) or 0), int(os.environ.get("NODE_RANK", 0) or 0))


class RunLock:
    """`with RunLock(run_dir):` holds the folder for this process (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self.took_over: str | None = None  # the stale holder's record, when one was taken over

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputError(
                f"run folder {self.run_dir} is in use by another run ({holder}); wait for it to end, stop it, "
                "or choose another run_name"
            ) from None
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:
            self.took_over = previous
            log.warning(f"run folder {self.run_dir}: took over the stale lock of a run that did not end ({previous})")
        record = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # empty: a clean exit (the file stays: unlinking would race)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
