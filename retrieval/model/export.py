"""Export a checkpoint's model for serving without this package: ONNX and TorchScript.

Both exported models map preprocessed images ``(batch, 3, S, S)`` (float32, resized to the
checkpoint's ``image_size`` S and normalised with its ``mean``/``std``, as
:func:`retrieval.model.checkpoint.preprocessing` does) to the vectors the index holds,
``(batch, dim)`` with unit L2 norm — the output of :meth:`EmbeddingNet.forward
<retrieval.model.networks.EmbeddingNet.forward>`.

- **ONNX** (:func:`export_onnx`): input ``images``, output ``embeddings``, the batch axis is
  dynamic, the image size fixed. ONNX has no adaptive pooling whose output size does not divide
  its input size (the ``small`` backbone pools a 4x4 map to 3x3), so before export every
  ``AdaptiveAvgPool2d`` is replaced by :class:`FixedAdaptiveAvgPool2d`: the same averages, for
  the one input size the checkpoint's images have, as two matrix products.
- **TorchScript** (:func:`export_torchscript`): ``torch.jit.script`` of the model itself (any
  batch and image size), loadable with ``torch.jit.load`` in Python or C++ (libtorch).

Beside each file, ``FILE.json`` records what the model expects and returns (image size, mean,
std, dimension, input and output names, the checkpoint's SHA-256). Files are written atomically.
:func:`max_difference` runs an exported file on a batch and compares it with PyTorch.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from retrieval.atomic import atomic_path, write_json
from retrieval.errors import UserError

logger = logging.getLogger(__name__)

#: ONNX operator set of exported models (onnxruntime >= 1.13 runs it).
ONNX_OPSET = 17
#: Names of the exported models' input and output.
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
#: Export formats, by the suffix of their metadata.
FORMATS = ("onnx", "torchscript")
#: Largest absolute difference from PyTorch's embeddings an exported model may show.
TOLERANCE = 1e-4
#: Images in the random batch :func:`max_difference` compares on.
CHECK_BATCH = 5


def pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)`` averaging matrix of adaptive pooling along one axis.

    Output cell ``i`` averages input cells :math:`\\lfloor i\\,n_{in}/n_{out} \\rfloor` to
    :math:`\\lceil (i+1)\\,n_{in}/n_{out} \\rceil - 1`, as ``nn.AdaptiveAvgPool2d`` does.

    Example:
        >>> pool_matrix(4, 3)
        tensor([[0.5000, 0.5000, 0.0000, 0.0000],
                [0.0000, 0.5000, 0.5000, 0.0000],
                [0.0000, 0.0000, 0.5000, 0.5000]])
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"pooling sizes must be positive, got {n_in} -> {n_out}")
    m = torch.zeros(n_out, n_in)
    for i in range(n_out):
        start, stop = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, start:stop] = 1.0 / (stop - start)
    return m


class FixedAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` for one input size, as matrix products (exportable to ONNX).

    .. math:: Y = P_h \\, X \\, P_w^\\top

    with :math:`P_h, P_w` from :func:`pool_matrix`, applied to every image and channel.

    Args:
        in_size: ``(H, W)`` of the input feature maps.
        out_size: ``(h, w)`` of the output.

    Shape:
        input ``(batch, C, H, W)``, output ``(batch, C, h, w)``.
    """

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int]):
        super().__init__()
        self.in_size = tuple(in_size)
        self.register_buffer("rows", pool_matrix(in_size[0], out_size[0]))  # (h, H)
        self.register_buffer("cols", pool_matrix(in_size[1], out_size[1]).T.contiguous())  # (W, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows @ x @ self.cols  # (batch, C, h, w)


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def with_fixed_pooling(model: nn.Module, image_size: int) -> nn.Module:
    """A copy of ``model`` (in eval mode) whose ``AdaptiveAvgPool2d`` layers are
    :class:`FixedAdaptiveAvgPool2d` for inputs of ``image_size`` pixels (found by running it
    once; layers the forward pass does not use are left as they are)."""
    model = copy.deepcopy(model).eval()
    pools = {name: m for name, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)}
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_hook(
            lambda m, args, out, name=name: sizes.__setitem__(name, tuple(args[0].shape[-2:]))
        )
        for name, m in pools.items()
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for h in hooks:
        h.remove()
    for name, pool in pools.items():
        if name not in sizes:  # defined but not used by forward
            continue
        out_size = tuple(
            i if o is None else o for i, o in zip(sizes[name], _pair(pool.output_size), strict=True)
        )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FixedAdaptiveAvgPool2d(sizes[name], out_size))
    return model


def model_card(state: dict, checkpoint_sha256: str, fmt: str) -> dict:
    """What an exported model expects and returns (written beside it as ``FILE.json``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    cfg = state["model_config"]
    size = int(cfg["image_size"])
    return {
        "format": fmt,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32"},
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", int(cfg["embedding_dim"])],
            "dtype": "float32",
            "norm": "unit L2 (cosine = inner product)",
        },
        "preprocessing": {
            "image_size": size,
            "mean": list(cfg["mean"]),
            "std": list(cfg["std"]),
            "steps": "resize the shorter side to image_size, centre-crop a square, "
            "RGB scaled to [0, 1], then (x - mean) / std per channel",
        },
        "checkpoint_sha256": checkpoint_sha256,
    }


def export_onnx(
    model: nn.Module, image_size: int, path: str | os.PathLike, card: dict | None = None
) -> Path:
    """Write ``model`` as ONNX (dynamic batch axis) to ``path``, and ``card`` beside it."""
    path = Path(path)
    exportable = with_fixed_pooling(model, image_size)
    example = torch.zeros(2, 3, image_size, image_size)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of the torch.export one, which
        # needs the onnxscript package; this one needs nothing beyond torch.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            exportable,
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    if card is not None:
        write_json(path.with_name(path.name + ".json"), card)
    logger.info("wrote %s", path)
    return path


def export_torchscript(
    model: nn.Module, image_size: int, path: str | os.PathLike, card: dict | None = None
) -> Path:
    """Write ``torch.jit.script(model)`` to ``path`` (``card`` also inside, as
    ``extra/model_card.json``), and ``card`` beside it.

    A model TorchScript cannot compile (third-party backbones such as EfficientNet-Lite's) is
    traced on a batch of ``image_size`` images instead: the result then expects that size.
    """
    path = Path(path)
    model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still works
        try:
            scripted = torch.jit.script(model)
        except (RuntimeError, torch.jit.frontend.FrontendError) as exc:
            reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else "?"
            logger.warning("cannot script the model (%s); tracing it at %d px", reason, image_size)
            scripted = torch.jit.trace(model, torch.zeros(2, 3, image_size, image_size))
        extra = {"model_card.json": json.dumps(card or {})}
        with atomic_path(path) as tmp:
            torch.jit.save(scripted, str(tmp), _extra_files=extra)
    if card is not None:
        write_json(path.with_name(path.name + ".json"), card)
    logger.info("wrote %s", path)
    return path


def run_onnx(path: str | os.PathLike, images: np.ndarray) -> np.ndarray:
    """Embeddings ``(batch, dim)`` of preprocessed ``images`` by an exported ONNX model, run with
    onnxruntime (``pip install onnxruntime``)."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("running ONNX models needs onnxruntime: pip install onnxruntime") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = np.ascontiguousarray(images, dtype=np.float32)
    return session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


def run_torchscript(path: str | os.PathLike, images: np.ndarray) -> np.ndarray:
    """Embeddings ``(batch, dim)`` of preprocessed ``images`` by an exported TorchScript model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return scripted(torch.as_tensor(images, dtype=torch.float32)).numpy()


def max_difference(
    model: nn.Module,
    path: str | os.PathLike,
    fmt: str,
    image_size: int,
    batch: int = CHECK_BATCH,
    seed: int = 0,
) -> float:
    """Largest ``|exported - PyTorch|`` over the embeddings of a random batch."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    images = torch.randn(
        batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        expected = model.eval()(images).numpy()
    run = run_onnx if fmt == "onnx" else run_torchscript
    return float(np.abs(run(path, images.numpy()) - expected).max())
