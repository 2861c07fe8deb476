"""Exporting a model for serving without this package."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.errors import UserError

if TYPE_CHECKING:  # imported for type hints only: the real imports are in the functions
    pass

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ export


def export_model(
    checkpoint: str | os.PathLike,
    onnx: str | os.PathLike | None = None,
    torchscript: str | os.PathLike | None = None,
    check: bool = True,
    image_size: int | None = None,
) -> list[tuple[str, Path, int, float | None]]:
    """Export a checkpoint's model (ONNX and/or TorchScript) with a ``FILE.json`` card beside
    each; returns ``(format, path, input side, max |difference| from PyTorch or None)``.

    Raises:
        UserError: nothing to write, or an export that differs from PyTorch beyond tolerance.
    """
    from retrieval.model.export import (
        TOLERANCE,
        export_onnx,
        export_torchscript,
        max_difference,
        model_card,
    )
    from retrieval.model.resolve import resolve_model

    if onnx is None and torchscript is None:
        raise UserError("give --onnx FILE.onnx and/or --torchscript FILE.pt")
    e = resolve_model(checkpoint, image_size)
    net, size, digest = e.model, e.image_size, e.sha256
    state = {"model_config": e.config.as_dict()}
    written = []
    if onnx is not None:
        written.append(("onnx", export_onnx(net, size, onnx, model_card(state, digest, "onnx"))))
    if torchscript is not None:
        card = model_card(state, digest, "torchscript")
        written.append(("torchscript", export_torchscript(net, size, torchscript, card)))
    out = []
    for fmt, path in written:
        diff = None
        if check:
            diff = max_difference(net, path, fmt, size)
            if diff > TOLERANCE:
                raise UserError(
                    f"{path}: the exported model differs from PyTorch by {diff:.2e} (more than "
                    f"{TOLERANCE:.0e}); do not use it"
                )
        out.append((fmt, Path(path), size, diff))
    return out
