"""Safe file output: atomic writes, numbered backups, per-output locks and a test failpoint.

Every file a pipeline writes goes through :func:`write_atomic`: the bytes go to a uniquely named
temporary file in the target folder (``.<name>.<random>.tmp``), are flushed and fsynced, get
the permissions a plain ``open()`` would give them, and are renamed over the target; the folder
is fsynced after the rename.  A crash or kill at any point leaves either the old file or the new
one, never a torn one.  Temporary files a killed write left behind are removed by the next run
that locks the same output (:class:`OutputLock`).

Any ``OSError`` while writing becomes :class:`WriteError`, a one-line user error naming the path.

``CBP_FAILPOINT`` (testing hook) injects a fault: ``3:oserror`` raises ``OSError(ENOSPC)``
inside the third write of this process, ``3:kill`` kills the process with SIGKILL after the
third write's temporary file is complete and before it is renamed, and ``3:nan`` turns the
third training loss that :meth:`cbp.run.Run.check_loss` sees into NaN.  A suffix ``@R``
limits the fault to the process of rank R (``3:nan@1``).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Iterable
from typing import IO, Any

import torch

from .errors import LockedError, WriteError

_writes = 0
_losses = 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _failpoint_spec() -> tuple[int, str]:
    spec, _, only_rank = os.environ.get("CBP_FAILPOINT", "").partition("@")
    if only_rank and only_rank != os.environ.get("RANK", "0"):
        return 0, ""
    number, _, kind = spec.partition(":")
    return (int(number), kind) if number else (0, "")


def _failpoint() -> None:
    """Count this write; fail or die here when ``CBP_FAILPOINT`` names it."""
    global _writes
    _writes += 1
    number, kind = _failpoint_spec()
    if number != _writes or kind not in ("kill", "oserror"):
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def failpoint_nan() -> bool:
    """Count a checked training loss; True when ``CBP_FAILPOINT=N:nan`` names this one."""
    global _losses
    _losses += 1
    number, kind = _failpoint_spec()
    return kind == "nan" and number == _losses


def temp_pattern(path: str) -> str:
    """Glob of the temporary files :func:`write_atomic` creates for ``path``."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")


def write_atomic(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Create or replace ``path`` with what ``write(file)`` writes, atomically and durably."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        _failpoint()
        os.replace(tmp, path)
        tmp = None
        fsync_dir(folder)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`write_atomic`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str, text: str) -> None:
    data = text.encode()
    write_atomic(path, lambda f: f.write(data))


def write_table(path: str, rows: Iterable[Iterable[float]]) -> None:
    """A progress table: tab-separated floats, no header, no index (pandas ``to_csv(sep='\\t',
    header=False, index=False)`` of float columns)."""
    write_text_atomic(path, "".join("\t".join(str(float(v)) for v in row) + "\n" for row in rows))


# ----------------------------------------------------------------------------- backups
def backup_name(path: str) -> str:
    return path + ".bak"


def rotate_backup(path: str) -> tuple[str, str | None] | None:
    """Keep the current ``path`` as ``path.bak`` (a hard link, or a copy where links are not
    supported) while ``path`` itself stays in place; an existing ``.bak`` first moves to the
    lowest free ``.bak.N``, so no earlier backup is removed.  Returns ``(bak, moved_to)`` for
    :func:`undo_backup`, or None when ``path`` does not exist."""
    if not os.path.exists(path):
        return None
    bak = backup_name(path)
    moved = None
    try:
        if os.path.exists(bak):
            n = 1
            while os.path.exists(f"{bak}.{n}"):
                n += 1
            moved = f"{bak}.{n}"
            os.replace(bak, moved)
        try:
            os.link(path, bak)
        except OSError:
            shutil.copy2(path, bak)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        raise WriteError(f"cannot back up {path}: {exc.strerror or exc}") from None
    return bak, moved


def undo_backup(made: tuple[str, str | None]) -> None:
    bak, moved = made
    with contextlib.suppress(OSError):
        os.remove(bak)
        if moved is not None:
            os.replace(moved, bak)


def promote(path: str, write: Callable[[str], None], backed_up: set[str]) -> str | None:
    """Replace a file other commands read (a best / pretrained / prequantized file).

    The first time this run replaces ``path``, the existing file is kept as ``path.bak``
    (:func:`rotate_backup`); later replacements in the same run overwrite the run's own earlier
    file.  ``path`` never goes missing: ``write`` replaces it atomically.  Returns the backup's
    path when one was made.
    """
    made = None if path in backed_up else rotate_backup(path)
    try:
        write(path)
    except BaseException:
        if made is not None:
            undo_backup(made)
        raise
    backed_up.add(path)
    return made[0] if made else None


# ----------------------------------------------------------------------------- locks
def lock_name(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.lock")


class OutputLock:
    """Exclusive locks on a set of output files, one ``.<name>.lock`` beside each.

    The lock is an ``fcntl.flock`` held for the life of the run: the kernel drops it when the
    process dies, so a lock file a killed run left behind is recognised as stale and taken
    over.  Taking a lock also removes the temporary files a killed write left for that output.
    """

    def __init__(self, paths: Iterable[str]) -> None:
        self.paths = sorted({os.path.abspath(p) for p in paths})
        self._held: list[tuple[str, int]] = []

    def acquire(self) -> OutputLock:
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform
            fcntl = None
        for path in self.paths:
            name = lock_name(path)
            folder = os.path.dirname(name)
            try:
                if os.path.exists(folder) and not os.path.isdir(folder):
                    raise NotADirectoryError(errno.ENOTDIR, f"{folder} is not a folder")
                os.makedirs(folder, exist_ok=True)
                fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                self.release()
                raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    owner = _read_owner(fd)
                    os.close(fd)
                    self.release()
                    raise LockedError(
                        f"{path} is being written by another run{owner}; wait for it to finish "
                        "or write elsewhere"
                    ) from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode())
            self._held.append((name, fd))
            for stale in glob.glob(temp_pattern(path)):
                with contextlib.suppress(OSError):
                    os.remove(stale)
        return self

    def release(self) -> None:
        while self._held:
            name, fd = self._held.pop()
            with contextlib.suppress(OSError):
                os.remove(name)
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_owner(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return f" (process {text})" if text else ""
