"""The inter-process writer lock of an index folder."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from retrieval.atomic import FolderBusyError, folder_lock, recover_dir
from retrieval.errors import UserError


@contextlib.contextmanager
def index_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Hold the inter-process writer lock of an index folder.

    The lock is keyed by the folder's real path (``.NAME.lock`` beside it), so writers that
    name the folder differently (a symbolic link, ``a/../idx``) still exclude each other. Once
    held, a swap a crash interrupted is finished and its leftovers are deleted
    (:func:`retrieval.atomic.recover_dir`).

    Raises:
        UserError: another process (a running server, another ``index add``) holds it.
    """
    with contextlib.ExitStack() as stack:
        try:
            real = stack.enter_context(folder_lock(directory))
        except FolderBusyError:
            raise UserError(
                f"{directory} is being changed by another process (a running `retrieval "
                "serve`?); change it through that process, or stop it first"
            ) from None
        recover_dir(real, clean=True)
        yield
