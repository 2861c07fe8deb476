"""Atomic file writes: a file is either the old version or the complete new one, never torn.

Everything the program writes (checkpoints, indexes, embeddings, reports) goes through here:
the content is written to a temporary file in the same folder, flushed to disk, then renamed
over the target (``os.replace`` is atomic on POSIX and Windows).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import UserError

try:  # POSIX; elsewhere there is no inter-process lock
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a new or renamed file) durable, where the platform allows."""
    with contextlib.suppress(OSError):  # not supported on every platform / filesystem
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)


#: ``renameat2`` flag that swaps two paths in one step (Linux 3.15+; ``<linux/fs.h>``).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class FolderBusyError(UserError):
    """Another process holds the lock of a folder."""


def real_path(path: str | os.PathLike) -> Path:
    """``path`` absolute with symbolic links and ``..`` resolved: one name per folder, so that
    a lock or a swap through a link acts on the folder itself, not on the link."""
    return Path(os.path.realpath(path))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False, changing nothing, where the system or file system cannot.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError, TypeError):  # no C library, or a libc without renameat2
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _entries(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def check_replaceable(path: Path, owned: Callable[[Path], bool] | None, what: str) -> None:
    """Refuse to put a new folder at ``path`` when something there is not ours to replace.

    A missing path or an empty folder may be replaced; anything else only when ``owned(path)``
    says the folder is one this program wrote (an index, a report).

    Raises:
        UserError: ``path`` is a file, or a folder whose content is not ours; nothing is touched.
    """
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise UserError(f"{path} is a file, not {what}; it was left untouched: choose another path")
    entries = _entries(path)
    if not entries or (owned is not None and owned(path)):
        return
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise UserError(
        f"{path} is a folder that is not {what} (it holds {shown}); it was left untouched: "
        "choose a new or empty folder"
    )


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike,
    owned: Callable[[Path], bool] | None = None,
    what: str = "a folder written by this program",
) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it takes the place of ``path``.

    Only a missing path, an empty folder, or a folder ``owned`` accepts (one of ours: see
    :func:`check_replaceable`) is ever replaced. A symbolic link is followed: the folder it
    points to is replaced, the link stays.

    The new folder is complete and fsync'd before it is swapped in. On Linux the swap is one
    atomic ``renameat2(RENAME_EXCHANGE)``; elsewhere it takes three renames (the complete new
    folder to ``.NAME.new-*``, the old one to ``.NAME.old-*``, the new one to ``path``), and
    :func:`recover_dir` finishes a swap a crash interrupted. Either way ``path`` holds the old
    folder or the complete new one, or can be brought back to one of them.
    """
    path = real_path(path)
    check_replaceable(path, owned, what)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        check_replaceable(path, owned, what)  # something may have appeared there meanwhile
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        _swap_in(tmp, path)
    finally:
        if tmp.exists():  # unfinished, or the old folder after an exchange
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, path: Path) -> None:
    parent = path.parent
    if not path.exists():
        os.rename(tmp, path)
        fsync_dir(parent)
        return
    if _exchange(tmp, path):
        fsync_dir(parent)  # tmp now holds the old folder; the caller deletes it
        return
    token = secrets.token_hex(4)
    new, old = parent / f".{path.name}.new-{token}", parent / f".{path.name}.old-{token}"
    os.rename(tmp, new)
    fsync_dir(parent)
    os.rename(path, old)
    os.rename(new, path)
    fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


#: Names :func:`atomic_dir` gives, after ``.NAME.``: the folder being filled (``mkdtemp``'s eight
#: random characters), the complete new copy, the old copy (``mkdtemp``'s or a hex token).
_LEFTOVER = {
    "tmp": re.compile(r"[a-z0-9_]{8}\.tmp"),
    "new": re.compile(r"new-[0-9a-f]{8}"),
    "old": re.compile(r"old-[a-z0-9_]{8}"),
}


def _leftovers(path: Path, kind: str) -> list[Path]:
    """Sibling folders named by :func:`atomic_dir` for ``path``: ``new``, ``old`` or ``tmp``."""
    prefix = f".{path.name}."
    pattern = _LEFTOVER[kind]
    out = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            name = entry.name
            if (
                name.startswith(prefix)
                and pattern.fullmatch(name[len(prefix) :])
                and entry.is_dir(follow_symlinks=False)
            ):
                out.append(Path(entry.path))
    return sorted(out, key=lambda p: p.stat().st_mtime)


def recover_dir(path: str | os.PathLike, clean: bool = False) -> bool:
    """Finish a folder swap of :func:`atomic_dir` that a crash interrupted.

    When ``path`` is missing but a complete new copy (``.NAME.new-*``) is beside it, the swap
    is rolled forward; with only the old copy (``.NAME.old-*``), back. Call it while holding
    :func:`folder_lock`; with ``clean``, also delete what interrupted writes left behind
    (unfinished ``.NAME.*.tmp`` folders, old copies no longer needed).

    Returns:
        Whether ``path`` was brought back.
    """
    path = real_path(path)
    restored = False
    if not os.path.lexists(path):
        pick = (_leftovers(path, "new") or _leftovers(path, "old") or [None])[-1]
        if pick is not None:
            os.rename(pick, path)
            fsync_dir(path.parent)
            logger.warning(
                "%s was missing after an interrupted write; restored it from %s", path, pick.name
            )
            restored = True
    if clean and path.exists():
        for leftover in _leftovers(path, "new") + _leftovers(path, "old") + _leftovers(path, "tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
    return restored


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike, timeout: float = 0.0) -> Iterator[Path]:
    """Hold the inter-process lock of a folder: ``.NAME.lock`` beside its real path, so every
    name of the folder (a symbolic link, ``a/../b``) takes the same lock. Yields the real path.

    Args:
        timeout: seconds to wait for the lock; 0 = fail at once.

    Raises:
        FolderBusyError: another process holds it.
    """
    path = real_path(path)
    if fcntl is None:  # pragma: no cover - no inter-process lock on this platform
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with open(path.parent / f".{path.name}.lock", "a+") as fh:
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise FolderBusyError(f"{path} is locked by another process") from None
                time.sleep(0.05)
        try:
            yield path
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_present(path: str | os.PathLike, timeout: float = 30.0) -> None:
    """Bring back a folder an interrupted swap left missing (see :func:`recover_dir`) before
    reading it. A writer mid-swap holds the folder's lock: wait for it to finish instead."""
    path = real_path(path)
    deadline = time.monotonic() + timeout
    while not os.path.lexists(path) and (_leftovers(path, "new") or _leftovers(path, "old")):
        try:
            with folder_lock(path):
                recover_dir(path)
            return
        except FolderBusyError:
            if time.monotonic() >= deadline:
                raise UserError(
                    f"{path} is being replaced by another process; try again when it has finished"
                ) from None
            time.sleep(0.05)


def content_hashes(refs: Sequence[str]) -> list[str | None]:
    """The SHA-256 of each reference that names a readable file (an image's content hash, what
    an index stores to recognise the same file under another name); None for the others
    (built-in references, files gone since they were read)."""
    out: list[str | None] = []
    for ref in refs:
        try:
            out.append(file_sha256(ref) if os.path.isfile(ref) else None)
        except OSError:
            out.append(None)
    return out


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (checksums, model identity)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
