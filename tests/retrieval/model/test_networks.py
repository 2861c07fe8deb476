"""The embedding network and its checkpoints."""

from __future__ import annotations

import pytest
import torch

from retrieval.errors import UserError
from retrieval.model.checkpoint import load_checkpoint, load_model, save_checkpoint
from retrieval.model.networks import BACKBONES, build_model


@pytest.mark.parametrize("arch,size", [("small", 28), ("small", 16), ("resnet18", 32)])
@pytest.mark.parametrize("embedding", ["head", "features"])
def test_outputs_are_unit_vectors_of_the_announced_size(arch, size, embedding):
    torch.manual_seed(0)
    model = build_model(arch, 64, embedding).eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        out = model(x)
        head = model.head_embedding(x)
    assert out.shape == (3, model.output_dim)
    assert head.shape == (3, 64)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(head.norm(dim=1), torch.ones(3))
    if embedding == "head":
        assert model.output_dim == 64
        torch.testing.assert_close(out, head)
    else:
        assert model.output_dim == BACKBONES[arch]("small", size, None)[1]
        torch.testing.assert_close(out, torch.nn.functional.normalize(model.backbone(x), dim=1))


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(set(BACKBONES) - {"small", "resnet18"}))
def test_every_backbone_embeds_small_images(arch):
    torch.manual_seed(0)
    model = build_model(arch, 16, "features", image_size=32).train()  # batch-norm on the batch
    with torch.no_grad():
        out = model(torch.randn(4, 3, 32, 32))
        head = model.head_embedding(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, model.output_dim) and head.shape == (4, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))


def test_imagenet_stem_keeps_the_torchvision_stem():
    small = build_model("mobilenet_v3_small", 8, stem="small")
    imagenet = build_model("mobilenet_v3_small", 8, stem="imagenet")
    assert small.backbone.features[0][0].stride == (1, 1)
    assert imagenet.backbone.features[0][0].stride == (2, 2)
    with pytest.raises(ValueError, match="stem must be"):
        build_model("small", 8, stem="tiny")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model("vgg")
    with pytest.raises(ValueError, match="positive"):
        build_model("small", 0)
    with pytest.raises(ValueError, match="embedding must be"):
        build_model("small", 8, "logits")


def test_checkpoint_roundtrip_restores_the_same_function(tmp_path):
    torch.manual_seed(0)
    model = build_model("small", 32, "features").eval()
    cfg = {
        "arch": "small",
        "head_dim": 32,
        "embedding": "features",
        "embedding_dim": model.output_dim,
        "image_size": 20,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    save_checkpoint(tmp_path / "m.pt", model, cfg, class_names=["a", "b"], epoch=3)
    restored, state = load_model(tmp_path / "m.pt")
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))
    assert state["epoch"] == 3 and state["class_names"] == ["a", "b"]
    assert list(tmp_path.iterdir()) == [tmp_path / "m.pt"]  # no temporary left


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # a foreign pickle
def test_foreign_files_are_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a metric-retrieval checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    # a pickle that would run code is refused by weights_only loading
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(UserError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_truncated_lite0_indexes_the_averaged_output_of_its_kept_blocks(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    import torch.nn.functional as F

    from retrieval.model.checkpoint import load_model, save_checkpoint
    from retrieval.model.spec import ModelConfig

    torch.manual_seed(0)
    full = build_model("efficientnet_lite0", 16, "features", stem="imagenet", image_size=64)
    cut = build_model(
        "efficientnet_lite0", 16, "features", stem="imagenet", image_size=64, backbone_blocks=15
    )
    kept = {k: v for k, v in full.backbone.state_dict().items() if k in cut.backbone.state_dict()}
    cut.backbone.load_state_dict(kept, strict=True)
    seen = []
    full.backbone.net._blocks[14].register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        full.eval()(x)
        got = cut.eval()(x)
    want = F.normalize(F.adaptive_avg_pool2d(seen[0], 1).flatten(1), dim=1)
    assert got.shape == (2, 192) and cut.output_dim == 192
    torch.testing.assert_close(got, want)
    # a checkpoint rebuilds the truncated network
    spec = ModelConfig(
        "efficientnet_lite0",
        16,
        "features",
        192,
        64,
        (0.5,) * 3,
        (0.5,) * 3,
        "imagenet",
        backbone_blocks=15,
    )
    save_checkpoint(tmp_path / "c.pt", cut, spec.as_dict())
    model, state = load_model(tmp_path / "c.pt")
    assert state["model_config"]["backbone_blocks"] == 15
    with torch.inference_mode():
        torch.testing.assert_close(model(x), got)
    assert (
        "backbone_blocks"
        not in ModelConfig.from_dict(spec.as_dict() | {"backbone_blocks": None}).as_dict()
    )


def test_a_pool_grid_keeps_the_layout_of_the_last_feature_map(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    import torch.nn.functional as F

    from retrieval.model.checkpoint import load_model, save_checkpoint
    from retrieval.model.spec import ModelConfig

    torch.manual_seed(0)
    kw = {"stem": "imagenet", "image_size": 96, "backbone_blocks": 15}
    pooled = build_model("efficientnet_lite0", 16, "features", **kw)
    grid = build_model("efficientnet_lite0", 16, "features", pool_grid=3, **kw)
    grid.backbone.load_state_dict(pooled.backbone.state_dict(), strict=True)
    seen = []
    grid.backbone.net._blocks[14].register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.rand(2, 3, 96, 96)
    with torch.inference_mode():
        got = grid.eval()(x)
        flat = pooled.eval()(x)
    fmap = seen[0]  # (2, 192, 3, 3) at 96 px: every cell its own 192 numbers
    assert fmap.shape == (2, 192, 3, 3) and got.shape == (2, 1728) == (2, grid.output_dim)
    torch.testing.assert_close(got, F.normalize(fmap.flatten(1), dim=1))
    # the cells average to the globally pooled vector
    cells = got.reshape(2, 192, 9) * fmap.flatten(1).norm(dim=1)[:, None, None]
    torch.testing.assert_close(F.normalize(cells.mean(2), dim=1), flat)
    spec = ModelConfig(
        "efficientnet_lite0", 16, "features", 1728, 96, (0.5,) * 3, (0.5,) * 3, "imagenet",
        backbone_blocks=15, pool_grid=3,
    )  # fmt: skip
    save_checkpoint(tmp_path / "g.pt", grid, spec.as_dict())
    model, state = load_model(tmp_path / "g.pt")
    assert state["model_config"]["pool_grid"] == 3
    with torch.inference_mode():
        torch.testing.assert_close(model(x), got)
    assert "pool_grid" not in ModelConfig.from_dict(spec.as_dict() | {"pool_grid": None}).as_dict()
    # a grid of 1 is the global average
    one = build_model("efficientnet_lite0", 16, "features", pool_grid=1, **kw)
    one.backbone.load_state_dict(pooled.backbone.state_dict(), strict=True)
    with torch.inference_mode():
        torch.testing.assert_close(one.eval()(x), flat)


@pytest.mark.parametrize(
    "arch,options,message",
    [
        ("small", {"backbone_blocks": 3}, "backbone_blocks applies to efficientnet_lite0"),
        ("efficientnet_lite0", {"backbone_blocks": 17}, "between 1 and 16"),
        ("small", {"pool_grid": 2}, "pool_grid applies to efficientnet_lite0"),
        ("efficientnet_lite0", {"pool_grid": 9}, "between 1 and 8"),
        ("efficientnet_lite0", {"pool_grid": 2}, "finer than the 1 x 1 feature map .* 28 px"),
    ],
)
def test_structure_options_that_cannot_apply_are_refused(arch, options, message):
    if arch == "efficientnet_lite0":
        pytest.importorskip("efficientnet_lite_pytorch")
    with pytest.raises(ValueError, match=message):
        build_model(arch, 16, "features", **options)
