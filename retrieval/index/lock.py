"""The inter-process writer lock of an index folder."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

from retrieval.atomic import FolderBusyError, folder_lock, real_path, recover_dir
from retrieval.errors import UserError

#: Real paths of the folders whose lock this process holds, with how many times.
_held: dict[str, int] = {}
_held_guard = threading.Lock()


@contextlib.contextmanager
def index_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Hold the inter-process writer lock of an index folder.

    The lock is keyed by the folder's real path (``.NAME.lock`` beside it), so writers that
    name the folder differently (a symbolic link, ``a/../idx``) still exclude each other. Once
    held, a swap a crash interrupted is finished and its leftovers are deleted
    (:func:`retrieval.atomic.recover_dir`).

    Raises:
        UserError: another process (a running server, another ``index add``) holds it, or its
            lock file cannot be made (a read-only mount).
    """
    with contextlib.ExitStack() as stack:
        try:
            real = stack.enter_context(folder_lock(directory))
        except FolderBusyError:
            raise UserError(
                f"{directory} is being changed by another process (a running `retrieval "
                "serve`?); change it through that process, or stop it first"
            ) from None
        except OSError as exc:  # its lock file cannot be made: a read-only mount, no rights
            raise UserError(
                f"{directory} cannot be changed here ({exc.strerror}); copy the index to a "
                "folder you can write"
            ) from None
        recover_dir(real, clean=True)
        key = str(real)
        with _held_guard:
            _held[key] = _held.get(key, 0) + 1
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
                if not _held[key]:
                    del _held[key]


def holds_lock(directory: str | os.PathLike) -> bool:
    """Whether this process holds the writer lock of the folder (:func:`index_lock`)."""
    with _held_guard:
        return str(real_path(directory)) in _held


@contextlib.contextmanager
def may_write(directory: str | os.PathLike) -> Iterator[bool]:
    """Yield whether this process may write the folder's files now: it holds the writer lock,
    or takes it for the duration of the block; False when another process holds it (or the
    lock cannot be made, e.g. in a read-only place)."""
    if holds_lock(directory):
        yield True
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(index_lock(directory))
            ok = True
        except (UserError, OSError):
            ok = False
        yield ok
