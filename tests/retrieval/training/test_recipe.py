"""The fine-tuning recipe for pretrained backbones and the options it is made of."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from data.datasets import ArrayStore, ImageDataset
from retrieval.errors import UserError
from retrieval.training.config import TrainConfig, resolve_config
from retrieval.training.loop import at_most_per_class, train
from retrieval.training.recipe import PRETRAINED_RECIPE
from tests.conftest import REPO
from tests.retrieval.training.test_loop import _cfg as _loop_cfg


def _cfg(digits_folder, out, **kw) -> TrainConfig:
    """test_loop's small run, without a validation split unless asked."""
    return _loop_cfg(digits_folder, out, **({"val_fraction": 0.0} | kw))


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def _changed(before: dict, after: dict, prefix: str) -> list[str]:
    return [
        k
        for k in before
        if k.startswith(prefix)
        and before[k].is_floating_point()
        and not torch.equal(before[k], after[k])
    ]


def test_at_most_per_class_draws_with_the_seed_and_keeps_small_classes_whole():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    ds = ImageDataset(
        ArrayStore(np.zeros((20, 2, 2), np.uint8)), labels, [str(i) for i in range(20)], list("abc")
    )
    a, b, c = (at_most_per_class(ds, 5, seed) for seed in (0, 0, 1))
    assert np.bincount(a.labels).tolist() == [5, 3, 5]
    assert a.index.tolist() == b.index.tolist() and a.index.tolist() != c.index.tolist()
    assert set(np.flatnonzero(labels == 1)) <= set(a.index.tolist())


def test_per_class_limits_the_training_images(digits_folder, tmp_path):
    from retrieval.training.distributed import Processes
    from retrieval.training.loop import prepare_data

    cfg = _cfg(digits_folder, tmp_path / "r", per_class=8, batch_size=16, m_per_class=4)
    data = prepare_data(cfg, Processes.current(torch.device("cpu")))
    assert np.bincount(data.train.labels).tolist() == [8] * 5
    assert data.steps == 40 // 16


def test_a_frozen_backbone_keeps_its_weights_and_the_head_trains(digits_folder, tmp_path):
    train(_cfg(digits_folder, tmp_path / "a", epochs=1, seed=1, backbone_lr=1e-3))
    train(_cfg(digits_folder, tmp_path / "f", epochs=1, seed=1, backbone_lr=0.0, freeze_bn=True))
    saved = torch.load(tmp_path / "f" / "last.pt", weights_only=True)
    frozen, moving = _weights(tmp_path / "f" / "last.pt"), _weights(tmp_path / "a" / "last.pt")
    # same seed, same start: the run with a learning backbone moved it, the frozen one did not
    from retrieval.model.networks import build_model

    torch.manual_seed(1)
    fresh = build_model("small", 128, "head").state_dict()
    assert _changed(fresh, moving, "backbone.")
    assert not _changed(fresh, frozen, "backbone.")
    assert _changed(fresh, frozen, "head.")
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(3e-4)


def test_the_backbone_trains_at_its_own_rate(digits_folder, tmp_path):
    train(_cfg(digits_folder, tmp_path / "g", lr=1e-3, backbone_lr=1e-5))
    groups = torch.load(tmp_path / "g" / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-5])
    n_head = 2  # the head's weight and bias (the triplet loss has no parameters)
    assert len(groups[0]["params"]) == n_head and len(groups[1]["params"]) > n_head


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_batchnorm_statistics_stay_as_they_started(digits_folder, tmp_path, freeze):
    from retrieval.model.networks import build_model

    torch.manual_seed(2)
    fresh = build_model("small", 128, "head").state_dict()
    train(_cfg(digits_folder, tmp_path / "b", seed=2, freeze_bn=freeze))
    after = _weights(tmp_path / "b" / "last.pt")
    stats = [k for k in fresh if k.endswith(("running_mean", "running_var"))]
    moved = [k for k in stats if not torch.equal(fresh[k], after[k])]
    assert stats and (moved == [] if freeze else moved == stats)
    assert _changed(fresh, after, "backbone.")  # the convolutions still learn


@pytest.mark.parametrize(
    "change,message",
    [({"backbone_lr": -1e-4}, "backbone_lr must not be negative"), ({"per_class": 1}, "per_class")],
)
def test_bad_recipe_options_are_refused(digits_folder, tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        train(_cfg(digits_folder, tmp_path / "x", **change))


def test_a_pretrained_start_takes_the_recipe_for_what_is_not_given():
    cfg = resolve_config({"arch": "efficientnet_lite0", "pretrained": "imagenet", "lr": 5e-4})
    for key in ("backbone_lr", "freeze_bn", "schedule", "embedding", "batch_size", "epochs"):
        assert getattr(cfg, key) == PRETRAINED_RECIPE[key]
    assert cfg.lr == 5e-4  # given: kept
    plain = resolve_config({})
    assert plain.backbone_lr is None and plain.freeze_bn is False and plain.embedding == "head"


def test_a_pretrained_lite0_starts_at_its_own_size_unless_told():
    cfg = resolve_config({"arch": "efficientnet_lite0", "pretrained": "imagenet"})
    assert (cfg.image_size, cfg.stem) == (224, "imagenet")  # as --model efficientnet_lite0
    given = resolve_config(
        {"arch": "efficientnet_lite0", "pretrained": "imagenet", "image_size": 96}
    )
    assert given.image_size == 96
    assert resolve_config({"arch": "resnet18", "pretrained": "imagenet"}).stem == "small"


def test_a_lite0_below_32_px_is_one_error():
    with pytest.raises(UserError, match="at least 32 px .* got image_size 28"):
        TrainConfig(arch="efficientnet_lite0", image_size=28).validate()


def test_a_config_file_value_beats_the_recipe(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pretrained: imagenet\narch: efficientnet_lite0\nfreeze_bn: false\n")
    cfg = resolve_config({}, path)
    assert cfg.freeze_bn is False and cfg.backbone_lr == PRETRAINED_RECIPE["backbone_lr"]


@pytest.mark.parametrize(
    "name,changes",
    [
        ("finetune-pretrained", {"image_size": 224}),
        (
            "finetune-pretrained-small-images",
            {"backbone_blocks": 15, "pool_grid": 3},
        ),
    ],
)
def test_the_recipe_config_files_are_the_recipe(name, changes):
    loaded = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    assert loaded == PRETRAINED_RECIPE | changes
    TrainConfig.from_dict(loaded).validate()


@pytest.mark.slow
def test_the_recipe_config_runs_and_its_baseline_is_what_evaluate_says(digits_folder, tmp_path):
    """Two steps of the recipe from EfficientNet-Lite0's ImageNet weights; the epoch-0 record on
    the held-out classes equals `retrieval evaluate` of the named model on those classes."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from retrieval.workflows.evaluate import evaluate_source

    values = yaml.safe_load((REPO / "configs" / "finetune-pretrained.yaml").read_text())
    changes = dict(data=str(digits_folder), classes="", out=str(tmp_path / "run"), device="cpu")
    changes |= dict(image_size=32, batch_size=32, m_per_class=8, epochs=1)
    cfg = TrainConfig.from_dict(values | changes | {"val_classes": "3,7"})
    records: list[dict] = []
    summary = train(cfg, on_epoch=records.append)
    assert [r["epoch"] for r in records] == [0, 1]
    assert np.isfinite(records[1]["loss"]) and summary["epochs_run"] == 1
    run = evaluate_source(
        str(digits_folder),
        "efficientnet_lite0",
        classes="3,7",
        image_size=32,
        clustering=False,
        device="cpu",
    )
    assert records[0]["val_map@r"] == pytest.approx(run.evaluation.metrics["map@r"], abs=1e-4)
    assert records[0]["val_recall@1"] == pytest.approx(run.evaluation.metrics["recall@1"], abs=1e-4)


def test_best_checkpoint_falls_back_to_a_pretrained_start_that_no_epoch_beats(
    digits_folder, tmp_path, monkeypatch, capsys
):
    """A learning rate that wrecks the network: best.pt is still the pretrained start."""
    import retrieval.training.loop as loop
    from retrieval.model.checkpoint import load_checkpoint
    from tests.conftest import run_cli

    start = tmp_path / "start.pt"
    torch.manual_seed(5)
    from retrieval.model.networks import build_model

    torch.save(build_model("small", 128, "head").backbone.state_dict(), start)
    scores = iter([0.5, 0.2, 0.3])  # epoch 0 (the start), 1, 2
    real = loop.evaluate

    def scripted(net, ds, procs, epoch, seed):
        return real(net, ds, procs, epoch, seed) | {"val_map@r": next(scores)}

    monkeypatch.setattr(loop, "evaluate", scripted)
    run = tmp_path / "run"
    code, out, _ = run_cli(
        ["train", "--data", digits_folder, "--arch", "small", "--pretrained", start]
        + ["--classes", "0-9", "--val-classes", "3,7", "--epochs", "2", "--batch-size", "32"]
        + ["--m-per-class", "8", "--image-size", "12", "--embedding", "head", "--device", "cpu"]
        + ["--out", run],
        capsys,
    )
    assert code == 0
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == 0 and best["metrics"]["val_map@r"] == 0.5
    assert "best.pt is the starting network" in " ".join(out.split())
    weights = torch.load(start, weights_only=True)
    for key, value in weights.items():
        torch.testing.assert_close(best["model"]["backbone." + key], value, rtol=0, atol=0)


def test_a_run_on_the_first_blocks_of_lite0_records_them(digits_folder, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    from retrieval.model.checkpoint import load_model

    cfg = _cfg(digits_folder, tmp_path / "b", arch="efficientnet_lite0", stem="imagenet")
    cfg.image_size, cfg.per_class, cfg.batch_size, cfg.m_per_class = 32, 8, 16, 4
    cfg.backbone_blocks, cfg.embedding = 5, "features"
    summary = train(cfg)
    model, state = load_model(summary["best_checkpoint"])
    assert state["model_config"]["backbone_blocks"] == 5
    assert state["model_config"]["embedding_dim"] == 40 == model.output_dim  # block 5: 40 ch.
    assert len(model.backbone.net._blocks) == 5


def test_a_run_with_a_pool_grid_indexes_every_cell(digits_folder, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    from retrieval.model.checkpoint import load_model

    cfg = _cfg(digits_folder, tmp_path / "g", arch="efficientnet_lite0", stem="imagenet")
    cfg.image_size, cfg.per_class, cfg.batch_size, cfg.m_per_class = 32, 8, 16, 4
    cfg.backbone_blocks, cfg.pool_grid, cfg.embedding = 5, 2, "features"
    summary = train(cfg)
    model, state = load_model(summary["best_checkpoint"])
    assert state["model_config"]["pool_grid"] == 2
    assert state["model_config"]["embedding_dim"] == 160 == model.output_dim  # 40 ch. x 2 x 2


def test_a_pool_grid_finer_than_the_feature_map_is_one_error(digits_folder, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    cfg = _cfg(digits_folder, tmp_path / "g", arch="efficientnet_lite0", stem="imagenet")
    cfg.image_size, cfg.backbone_blocks, cfg.embedding = 32, 5, "features"
    cfg.pool_grid = 5  # 32 px -> the 5th block's map is 4 x 4
    with pytest.raises(UserError, match="finer than the 4 x 4 feature map .* at most 4"):
        train(cfg)
    assert not (tmp_path / "g" / "best.pt").exists()


@pytest.mark.parametrize("grid", [0, 9, -1])
def test_a_pool_grid_out_of_range_is_one_error(grid):
    with pytest.raises(UserError, match="pool_grid must be between 1 and 8"):
        TrainConfig(pool_grid=grid).validate()


def test_backbone_blocks_on_another_backbone_is_one_error(digits_folder, tmp_path):
    with pytest.raises(UserError, match="applies to efficientnet_lite0"):
        train(_cfg(digits_folder, tmp_path / "x", backbone_blocks=3))
