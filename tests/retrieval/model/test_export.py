"""Export to ONNX and TorchScript: the exported models give PyTorch's embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data.datasets import open_source
from retrieval.model.checkpoint import load_model, preprocessing, save_checkpoint
from retrieval.model.export import (
    TOLERANCE,
    FixedAdaptiveAvgPool2d,
    export_onnx,
    export_torchscript,
    max_difference,
    run_onnx,
    run_torchscript,
)
from retrieval.model.networks import build_model
from tests.conftest import run_cli

pytest.importorskip("onnxruntime")

IMAGE_SIZE = 16


def make_checkpoint(
    path: Path, arch: str = "small", embedding: str = "head", seed: int = 0, dim: int = 32
) -> Path:
    """A checkpoint of an untrained model with random batch-norm statistics (so that eval-mode
    normalisation is not the identity), without running the trainer."""
    torch.manual_seed(seed)
    model = build_model(arch, dim, embedding, image_size=IMAGE_SIZE)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    config = {
        "arch": arch,
        "head_dim": dim,
        "embedding": embedding,
        "embedding_dim": model.output_dim,
        "image_size": IMAGE_SIZE,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }
    save_checkpoint(path, model, config)
    return path


@pytest.mark.parametrize(
    "in_size,out_size",
    [((4, 4), (3, 3)), ((7, 5), (3, 2)), ((8, 6), (1, 1)), ((5, 5), (5, 5)), ((3, 9), (2, 4))],
)
def test_fixed_pooling_equals_adaptive_pooling(in_size, out_size):
    x = torch.randn(2, 3, *in_size)
    expected = nn.AdaptiveAvgPool2d(out_size)(x)
    got = FixedAdaptiveAvgPool2d(in_size, out_size)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_cli_export_gives_pytorch_embeddings(tmp_path, trained_run, digits_folder, capsys):
    ckpt = trained_run / "best.pt"
    onnx_path, ts_path = tmp_path / "out" / "model.onnx", tmp_path / "out" / "model.ts"
    code, out, err = run_cli(
        ["export", ckpt, "--onnx", onnx_path, "--torchscript", ts_path], capsys
    )
    assert code == 0, err
    assert "max |difference| from PyTorch" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "model.onnx",
        "model.onnx.json",
        "model.ts",
        "model.ts.json",
    ]  # no temporaries left

    card = json.loads((tmp_path / "out" / "model.onnx.json").read_text())
    model, state = load_model(ckpt)
    cfg = state["model_config"]
    assert card["input"]["shape"] == ["batch", 3, cfg["image_size"], cfg["image_size"]]
    assert card["output"]["shape"] == ["batch", cfg["embedding_dim"]]
    assert card["preprocessing"]["mean"] == list(cfg["mean"])

    # Real gallery images, preprocessed as the index does, in batches of several sizes
    # (the batch axis is dynamic).
    ds = open_source(str(digits_folder)).with_transform(preprocessing(state))
    images = torch.stack([ds[i][0] for i in range(0, len(ds), 25)])  # (12, 3, 16, 16)
    with torch.no_grad():
        expected = model(images).numpy()
    for batch in (1, 5, len(images)):
        x = images[:batch].numpy()
        np.testing.assert_allclose(run_onnx(onnx_path, x), expected[:batch], rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(
            run_torchscript(ts_path, x), expected[:batch], rtol=0, atol=TOLERANCE
        )
    # The embeddings differ from each other far more than the tolerance: matching means something.
    assert np.abs(expected - expected.mean(axis=0)).max() > 100 * TOLERANCE


@pytest.mark.parametrize(
    "arch,embedding",
    [("small", "features"), pytest.param("mobilenet_v3_small", "head", marks=pytest.mark.slow)],
)
def test_export_api_other_models(tmp_path, arch, embedding):
    model, _ = load_model(make_checkpoint(tmp_path / "m.pt", arch, embedding))
    onnx_path = export_onnx(model, IMAGE_SIZE, tmp_path / "m.onnx")
    ts_path = export_torchscript(model, IMAGE_SIZE, tmp_path / "m.ts")
    assert max_difference(model, onnx_path, "onnx", IMAGE_SIZE) <= TOLERANCE
    assert max_difference(model, ts_path, "torchscript", IMAGE_SIZE) <= TOLERANCE


def test_a_lite0_on_a_grid_exports_when_the_grid_does_not_divide_its_map(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    from retrieval.model.networks import build_model

    torch.manual_seed(0)
    # 112 px: the 15th block's map is 4 x 4, pooled to 3 x 3 (overlapping cells)
    model = build_model(
        "efficientnet_lite0", 16, "features", stem="imagenet", image_size=112,
        backbone_blocks=15, pool_grid=3,
    ).eval()  # fmt: skip
    onnx_path = export_onnx(model, 112, tmp_path / "g.onnx")
    assert max_difference(model, onnx_path, "onnx", 112) <= TOLERANCE
    assert (
        max_difference(model, export_torchscript(model, 112, tmp_path / "g.ts"), "torchscript", 112)
        <= TOLERANCE
    )


def test_export_needs_a_format_and_a_checkpoint(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "model.pt")
    code, _, err = run_cli(["export", ckpt], capsys)
    assert code == 2 and "--onnx" in err
    code, _, err = run_cli(
        ["export", tmp_path / "missing.pt", "--onnx", tmp_path / "m.onnx"], capsys
    )
    assert code == 2 and "no such model" in err
    assert not (tmp_path / "m.onnx").exists()
