"""Exclusive file locks between processes: a run folder owned by one live run, one writer of a shared file.

:func:`acquire` takes ``fcntl.flock`` on a lock file (created if needed). The kernel drops a flock when its process
dies, even by ``kill -9``, so a lock is never held by a dead process; the owner's pid, host and start time are
written into the file only so that a refused process can name who holds it, and so that a lock left behind by a
dead owner is recognised (and taken over, with a warning) by the next one. :func:`release` removes the file; a
process that opened it just before is sent round again (the lock must be on the file the path names), so two
processes can never both hold "the" lock.

Without ``fcntl`` (Windows) nothing is locked: the owner is still recorded, but a second process is not refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
_BUSY = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


class LockBusy(Exception):
    """Raised by :func:`acquire` (``wait=False``) when another process holds the lock; ``owner`` says who."""

    def __init__(self, path: Path, owner: dict) -> None:
        super().__init__(f"{path}: locked by {describe(owner)}")
        self.path, self.owner = path, owner


@dataclass
class Lock:
    """A held lock: its file, the open descriptor, and what the file said before we took it (a dead owner)."""

    path: Path
    fd: int
    previous: dict


def describe(owner: dict) -> str:
    """``pid 123 on host-a, started 2024-05-01 12:00:00`` (``pid unknown`` when the file was empty)."""
    if not owner.get("pid"):
        return "pid unknown"
    text = f"pid {owner['pid']}"
    if owner.get("host"):
        text += f" on {owner['host']}"
    if owner.get("started"):
        text += f", started {owner['started']}"
    return text


def _owner_of(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        owner = json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _alive(owner: dict) -> bool:
    """Whether ``owner``'s process runs (assumed so for another host's, which cannot be checked from here)."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, owned by someone else
        return True
    return True


def _is_current(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file that ``path`` names (a releasing owner unlinks it first)."""
    try:
        cur = os.stat(path)
    except FileNotFoundError:
        return False
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (cur.st_dev, cur.st_ino)


def acquire(path: str | Path, wait: bool = False, record: bool = True) -> Lock:
    """Take the exclusive lock of ``path`` (the lock file, created if needed; its folder must exist).

    Args:
        wait: block until the holder releases it; without it a held lock raises :class:`LockBusy` at once.
        record: write this process's pid, host and start time into the file (so that others can name it).

    Returns:
        the :class:`Lock`; ``lock.previous`` is what a dead owner left in the file (empty when it was released).
    """
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            if e.errno not in _BUSY:
                os.close(fd)
                raise
            owner = _owner_of(fd)
            for _ in range(40):  # the holder writes its name just after taking the lock: give it a moment
                if _alive(owner):
                    break
                time.sleep(0.05)
                owner = _owner_of(fd)
            os.close(fd)
            raise LockBusy(path, owner) from None
        if not _is_current(fd, path):  # locked a file its owner had just removed: go round again
            os.close(fd)
            continue
        previous = _owner_of(fd)
        if record:
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            data = (json.dumps(me) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        return Lock(path=path, fd=fd, previous=previous)


def release(lock: Lock) -> None:
    """Remove the lock file, then drop the lock (explicitly: a forked child may share the descriptor)."""
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock.path)
        if fcntl is not None:
            fcntl.flock(lock.fd, fcntl.LOCK_UN)
    finally:
        os.close(lock.fd)


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[Lock]:
    """Hold the lock of ``path`` for a ``with`` block, waiting for another holder first (one writer at a time)."""
    lock = acquire(path, wait=True, record=False)
    try:
        yield lock
    finally:
        release(lock)
