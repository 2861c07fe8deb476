"""Pretrained backbones: local torchvision-format files, ImageNet without a network, and the
offline EfficientNet-Lite0 weights of the [pretrained] extra."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from data.datasets import open_source
from data.transforms import eval_transform
from retrieval.errors import UserError
from retrieval.evaluation.evaluate import evaluate_embeddings
from retrieval.model.embed import embed_dataset
from retrieval.model.networks import build_model
from retrieval.model.pretrained import input_norm, load_pretrained
from tests.conftest import run_cli


def test_a_torchvision_state_dict_file_is_loaded_into_the_backbone(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    weights = load_pretrained("mobilenet_v3_small", tmp_path / "w.pt")
    model = build_model("mobilenet_v3_small", 8, weights=weights)
    for name in ("features.0.0.weight", "features.12.0.weight"):
        torch.testing.assert_close(model.backbone.state_dict()[name], reference.state_dict()[name])


def test_weights_of_another_network_are_refused(tmp_path):
    torch.save(torchvision.models.get_model("resnet18").state_dict(), tmp_path / "r18.pt")
    weights = load_pretrained("mobilenet_v3_small", tmp_path / "r18.pt")
    with pytest.raises(ValueError, match="do not fit 'mobilenet_v3_small'"):
        build_model("mobilenet_v3_small", 8, weights=weights)


class NotWeights:
    pass


def test_files_that_are_not_plain_state_dicts_are_refused_without_unpickling(tmp_path):
    torch.save({"x": NotWeights()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="not a readable weights file"):
        load_pretrained("resnet18", tmp_path / "evil.pt")
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(UserError, match="not a state dict"):
        load_pretrained("resnet18", tmp_path / "meta.pt")
    with pytest.raises(UserError, match="no such weights file"):
        load_pretrained("resnet18", tmp_path / "missing.pt")


def test_imagenet_without_a_network_says_what_to_do(no_network):
    with pytest.raises(UserError, match="could not download") as err:
        load_pretrained("resnet18", "imagenet")
    assert "--pretrained PATH" in str(err.value) and "efficientnet_lite0" in str(err.value)
    with pytest.raises(UserError, match="has no ImageNet weights"):
        load_pretrained("small", "imagenet")


def test_the_command_line_reports_the_failed_download(no_network, digits_folder, tmp_path, capsys):
    code, _, err = run_cli(
        [
            "train",
            "--data",
            digits_folder,
            "--arch",
            "resnet18",
            "--pretrained",
            "imagenet",
            "--epochs",
            "1",
            "--batch-size",
            "40",
            "--m-per-class",
            "8",
            "--image-size",
            "16",
            "--device",
            "cpu",
            "--out",
            tmp_path / "run",
        ],
        capsys,
    )
    assert code == 2
    assert "could not download torchvision's ImageNet weights for resnet18" in " ".join(err.split())


#: The real Fashion-MNIST, when the machine has it (the set-up script installs it here).
REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
def test_efficientnet_lite0_imagenet_features_already_retrieve(fake_fmnist):
    """Never trained on clothes, EfficientNet-Lite0's ImageNet features retrieve 300 test images
    of Fashion-MNIST's classes 5-9 well (R@1 0.90, MAP@R 0.50 measured), far better than the
    same network with random weights (0.83, 0.34). Without the real set, on the digits
    stand-in, only R@1 is checked."""
    real = (REAL_FMNIST / "t10k-labels-idx1-ubyte.gz").is_file()
    root = REAL_FMNIST if real else fake_fmnist
    test = open_source("fashion-mnist", split="test", root=str(root)).filter_classes(range(5, 10))
    rng = np.random.default_rng(0)
    test = test.subset(np.sort(rng.choice(len(test), size=300, replace=False)))
    mean, std = input_norm("efficientnet_lite0")
    images = test.with_transform(eval_transform(64, mean, std))
    scores = {}
    for name, weights in [
        ("imagenet", load_pretrained("efficientnet_lite0", "imagenet")),
        ("random", None),
    ]:
        torch.manual_seed(0)
        model = build_model("efficientnet_lite0", 16, "features", image_size=64, weights=weights)
        scores[name] = evaluate_embeddings(embed_dataset(model, images), test.labels, ks=(1,))
    assert scores["imagenet"]["recall@1"] > 0.8
    if real:
        assert scores["imagenet"]["map@r"] > 0.45
        assert scores["imagenet"]["map@r"] > scores["random"]["map@r"] + 0.1
