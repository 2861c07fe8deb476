"""The training loop: repeatable, validated, and safe on a bad loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from data.datasets import open_source
from retrieval.errors import UserError
from retrieval.training.config import resolve_config
from retrieval.training.loop import TrainConfig, channel_stats, train
from retrieval.training.objectives import NAMED_LOSSES, TRAINING_LOSSES, Objective
from tests.conftest import run_cli


def _cfg(digits_folder, out, **kw) -> TrainConfig:
    base = dict(
        data=str(digits_folder),
        classes="0-4",
        epochs=1,
        batch_size=40,
        m_per_class=8,
        image_size=12,
        device="cpu",
        out=str(out),
        val_fraction=0.2,
    )
    return TrainConfig(**(base | kw))


def test_same_seed_same_weights(digits_folder, tmp_path):
    train(_cfg(digits_folder, tmp_path / "a", seed=3))
    train(_cfg(digits_folder, tmp_path / "b", seed=3))
    train(_cfg(digits_folder, tmp_path / "c", seed=4))
    a, b, c = (torch.load(tmp_path / n / "last.pt", weights_only=True)["model"] for n in "abc")
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_features_embedding_is_recorded(digits_folder, tmp_path):
    summary = train(_cfg(digits_folder, tmp_path / "f", embedding="features", embedding_dim=16))
    state = torch.load(summary["best_checkpoint"], weights_only=True)
    assert state["model_config"]["embedding"] == "features"
    assert state["model_config"]["head_dim"] == 16
    assert state["model_config"]["embedding_dim"] == 128 * 9  # small convnet, 3x3 grid


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
    digits_folder, tmp_path, monkeypatch
):
    cfg = _cfg(digits_folder, tmp_path / "run", epochs=2)
    calls = {"n": 0}
    real = Objective.forward

    def exploding(self, *args, **kwargs):
        calls["n"] += 1
        loss = real(self, *args, **kwargs)
        steps_per_epoch = 160 // 40  # 200 images of 5 classes, 20% held out
        return loss * float("nan") if calls["n"] > steps_per_epoch else loss

    monkeypatch.setattr(Objective, "forward", exploding)
    with pytest.raises(UserError, match="loss became nan at epoch 2"):
        train(cfg)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]  # 0: the untrained network


@pytest.mark.parametrize("loss", NAMED_LOSSES)
def test_every_named_loss_trains_from_the_command_line(loss, digits_folder, tmp_path, capsys):
    run = tmp_path / loss
    code, out, err = run_cli(
        [
            "train",
            "--data",
            digits_folder,
            "--classes",
            "0-4",
            "--loss",
            loss,
            "--epochs",
            "1",
            "--batch-size",
            "40",
            "--m-per-class",
            "8",
            "--image-size",
            "12",
            "--val-fraction",
            "0.2",
            "--device",
            "cpu",
            "--out",
            run,
        ],
        capsys,
    )
    assert code == 0, err
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["train_config"]["loss"] == loss
    assert all(torch.isfinite(torch.tensor(state["metrics"]["loss"])).reshape(-1))
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["miner"] == TRAINING_LOSSES[loss].default_miner
    if loss == "arcface":  # the class weights are trained and saved
        assert state["loss"]["loss.pml.W"].shape == (128, 5)
        last = state["optimizer"]["param_groups"][0]["params"][-1]
        assert state["optimizer"]["state"][last]["exp_avg"].shape == (128, 5)
    assert (run / "curves.png").is_file()


def test_a_miner_that_does_not_fit_is_refused_on_the_command_line(digits_folder, tmp_path, capsys):
    code, _, err = run_cli(
        [
            "train",
            "--data",
            digits_folder,
            "--loss",
            "contrastive",
            "--miner",
            "semi-hard",
            "--out",
            tmp_path / "x",
        ],
        capsys,
    )
    assert code == 2
    assert "miners that fit: all, pair-margin, multi-similarity" in " ".join(err.split())


def test_yaml_defaults_command_line_overrides_and_the_resolved_config(
    digits_folder, tmp_path, capsys
):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "data": str(digits_folder),
                "classes": "0-4",
                "loss": "triplet",
                "epochs": 5,
                "batch_size": 40,
                "m_per_class": 8,
                "image_size": 12,
                "val_fraction": 0.2,
                "device": "cpu",
                "loss_args": {"margin": 0.3},
            }
        )
    )
    run = tmp_path / "run"
    code, _, err = run_cli(
        [
            "train",
            "--config",
            cfg_file,
            "--loss",
            "infonce",
            "--epochs",
            "1",
            "--loss-arg",
            "temperature=0.2",
            "--out",
            run,
        ],
        capsys,
    )
    assert code == 0, err
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["loss"] == "infonce" and resolved["epochs"] == 1
    assert resolved["loss_args"] == {"temperature": 0.2}  # the command line replaces the mapping
    assert resolved["batch_size"] == 40


def test_resume_continues_exactly_where_it_stopped(digits_folder, tmp_path):
    whole = train(
        _cfg(
            digits_folder,
            tmp_path / "whole",
            epochs=3,
            loss="arcface",
            schedule="cosine",
            warmup_epochs=0.5,
            grad_clip=1.0,
        )
    )
    train(
        _cfg(
            digits_folder,
            tmp_path / "cut",
            epochs=1,
            loss="arcface",
            schedule="cosine",
            warmup_epochs=0.5,
            grad_clip=1.0,
        )
    )
    # the run was configured for 3 epochs: only the epoch count (not the schedule) differs
    cfg = _cfg(
        digits_folder,
        tmp_path / "cut",
        epochs=3,
        loss="arcface",
        schedule="cosine",
        warmup_epochs=0.5,
        grad_clip=1.0,
    )
    first = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert first["epoch"] == 1
    resumed = train(cfg, resume=True)
    assert resumed["epochs_run"] == whole["epochs_run"] == 3
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1, 2, 3]


def test_resume_refuses_a_different_run(digits_folder, tmp_path):
    train(_cfg(digits_folder, tmp_path / "run"))
    with pytest.raises(UserError, match="different loss"):
        train(_cfg(digits_folder, tmp_path / "run", loss="contrastive"), resume=True)
    with pytest.raises(UserError, match="no such checkpoint file"):
        train(_cfg(digits_folder, tmp_path / "empty"), resume=True)


def test_early_stopping_and_warmup_cosine_schedule(digits_folder, tmp_path, monkeypatch):
    import retrieval.training.loop as train_module

    scores = iter([0.5, 0.4, 0.3, 0.2, 0.1])
    real = train_module.evaluate_embeddings
    monkeypatch.setattr(
        train_module, "evaluate_embeddings", lambda *a, **k: real(*a, **k) | {"map@r": next(scores)}
    )
    summary = train(
        _cfg(
            digits_folder,
            tmp_path / "run",
            epochs=5,
            patience=2,
            schedule="cosine",
            warmup_epochs=1.0,
        )
    )
    assert summary["stopped_early"] and summary["epochs_run"] == 3 and summary["epoch"] == 1
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines][1:]  # after the untrained baseline
    assert records[0]["lr"] == pytest.approx(3e-4)  # the last warm-up step reaches the peak
    assert records[2]["lr"] < records[1]["lr"] < records[0]["lr"]  # then the cosine decays


def test_collapsed_embeddings_are_reported(digits_folder, tmp_path, monkeypatch, caplog):
    from retrieval.training.distributed import Processes

    monkeypatch.setattr(
        Processes, "embed", lambda self, model, ds: np.ones((len(ds), 8), dtype=np.float32)
    )
    with caplog.at_level("WARNING", logger="retrieval.training.loop"):
        train(_cfg(digits_folder, tmp_path / "run"))
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["collapsed"] is True and record["val_mean_cosine"] == pytest.approx(1.0)
    assert "collapsed" in caplog.text


@pytest.mark.parametrize(
    "change,message",
    [
        ({"batch_size": 30, "m_per_class": 8}, "multiple of m_per_class"),
        ({"batch_size": 8, "m_per_class": 8}, "at least two classes"),
        ({"batch_size": 48, "m_per_class": 8}, "needs 6 classes"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"embedding": "logits"}, "embedding must be one of"),
        ({"arch": "vgg"}, "unknown backbone"),
        ({"loss": "focal"}, "loss must be one of"),
        ({"miner": "hardest"}, "unknown miner"),
        ({"schedule": "step"}, "schedule must be one of"),
        ({"grad_clip": -1.0}, "grad_clip must not be negative"),
        ({"classes": "3"}, "at least two classes"),
        ({"val_fraction": 1.0}, "val_fraction"),
    ],
)
def test_impossible_configurations_are_refused(digits_folder, tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        train(_cfg(digits_folder, tmp_path / "x", **change))


def test_channel_stats_match_numpy(digits_folder):
    ds = open_source(str(digits_folder))
    mean, std = channel_stats(ds, max_images=10_000)
    pixels = torch.stack([ds.image(i) for i in range(len(ds))]).double() / 255
    want_mean = pixels.mean(dim=(0, 2, 3))
    want_std = pixels.std(dim=(0, 2, 3), unbiased=False)
    assert mean == pytest.approx(want_mean.tolist(), abs=1e-4)
    assert std == pytest.approx(want_std.tolist(), abs=1e-4)


@pytest.mark.parametrize(
    "line,message",
    [
        ('epochs: "3"', "epochs must be a whole number, got '3'"),
        ("augment: 1", "augment must be true or false, got 1"),
        ("pool_grid: true", "pool_grid must be a whole number or nothing (null), got True"),
        ("lr: fast", "lr must be a number, got 'fast'"),
        ("loss_args: [1, 2]", "loss_args must be a mapping of key: value, got [1, 2]"),
    ],
)
def test_a_config_file_value_of_the_wrong_type_is_one_error(tmp_path, line, message):
    path = tmp_path / "c.yaml"
    path.write_text(line + "\n")
    with pytest.raises(UserError) as caught:
        resolve_config({}, path)
    assert str(caught.value) == message


def test_numbers_in_a_config_file_are_read_as_the_text_fields_they_fill(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("val_classes: 0.4\nclasses: 5\nlr: 1\nbackbone_lr: 0\n")
    cfg = resolve_config({}, path)
    assert (cfg.val_classes, cfg.classes) == ("0.4", "5")  # YAML read them as numbers
    assert cfg.lr == 1 and cfg.backbone_lr == 0  # a whole number is a number


def test_every_example_config_is_valid():

    from tests.conftest import REPO

    root = REPO / "configs"
    files = sorted(root.glob("*.yaml"))
    assert {f.stem for f in files} >= set(NAMED_LOSSES)
    for f in files:
        cfg = TrainConfig.from_dict(yaml.safe_load(f.read_text()))
        cfg.validate()
        assert cfg.loss == f.stem or f.stem not in TRAINING_LOSSES


def _dataset(per_class: int, classes: int = 5):
    from data.datasets import ArrayStore, ImageDataset

    n = per_class * classes
    images = np.zeros((n, 4, 4), dtype=np.uint8)
    labels = np.repeat(np.arange(classes), per_class)
    return ImageDataset(ArrayStore(images), labels, [str(i) for i in range(n)], list("abcde"))


@pytest.mark.parametrize(
    "per_class,fraction,works",
    [
        (40, 0.02, "between 0.025 and 0.975"),  # 4 of 200 held out: fewer than the 5 classes
        (2, 0.1, "0.5"),  # 2 images per class: exactly one of each is held out
        (2, 0.7, "0.5"),  # too many held out: fewer training images than classes
    ],
)
def test_a_validation_fraction_that_cannot_hold_out_every_class_says_what_works(
    per_class, fraction, works
):
    from retrieval.training.loop import split_train_val

    with pytest.raises(UserError) as caught:
        split_train_val(_dataset(per_class), fraction, seed=0)
    message = str(caught.value)
    assert "\n" not in message
    assert f"val_fraction {fraction}" in message and "5 classes" in message
    assert works in message


def test_a_validation_fraction_at_the_stated_bound_works():
    from retrieval.training.loop import split_train_val

    train_set, val_set = split_train_val(_dataset(2), 0.5, seed=0)
    assert np.bincount(val_set.labels).tolist() == [1] * 5
    assert np.bincount(train_set.labels).tolist() == [1] * 5
    train_set, val_set = split_train_val(_dataset(40), 0.025, seed=0)
    assert np.bincount(val_set.labels).tolist() == [1] * 5


def test_a_too_small_validation_fraction_is_one_error_line_on_the_command_line(
    digits_folder, tmp_path, capsys
):
    code, _, err = run_cli(
        ["train", "--data", digits_folder, "--classes", "0-4", "--val-fraction", "0.01"]
        + ["--device", "cpu", "--out", tmp_path / "run"],
        capsys,
    )
    assert code == 2
    assert "Traceback" not in err and "val_fraction 0.01" in " ".join(err.split())


# ---------------------------------------------------------------- class-disjoint validation


def test_held_out_classes_never_appear_in_training_batches(digits_folder, tmp_path):
    from retrieval.training.distributed import Processes
    from retrieval.training.loop import prepare_data

    cfg = _cfg(digits_folder, tmp_path / "run", classes="0-9", val_fraction=None)
    cfg.val_classes = "3,7"
    data = prepare_data(cfg, Processes.current(torch.device("cpu")))
    assert data.val_classes == ["digit3", "digit7"]
    assert sorted(np.unique(data.val.labels).tolist()) == [3, 7]
    assert not np.isin(data.train.labels, [3, 7]).any()
    seen = set()
    for _ in range(3):  # epochs: the sampler reshuffles
        for _, targets in data.loader:
            seen |= set(targets.tolist())
    assert seen == {0, 1, 2, 4, 5, 6, 8, 9}


def test_a_fraction_of_classes_is_drawn_with_the_seed_and_recorded(digits_folder, tmp_path):
    cfg = _cfg(digits_folder, tmp_path / "run", classes="0-9", val_fraction=None)
    cfg.val_classes = "0.3"
    summary = train(cfg)
    state = torch.load(summary["best_checkpoint"], weights_only=True)
    held = state["validation_classes"]
    assert len(held) == 3 and held == sorted(held)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["validation_classes"] == (
        held
    )
    assert "val_map@r" in summary  # best.pt selected on the held-out classes
    from retrieval.training.loop import split_val_classes

    again = split_val_classes(open_source(str(digits_folder)), "0.3", seed=0)[2]
    assert again == held
    assert split_val_classes(open_source(str(digits_folder)), "0.3", seed=1)[2] != held


def test_held_out_classes_by_name():
    from retrieval.training.loop import split_val_classes

    train_set, val_set, names = split_val_classes(_dataset(4), "b,e", seed=0)
    assert names == ["b", "e"]
    assert sorted(set(val_set.labels.tolist())) == [1, 4]
    assert sorted(set(train_set.labels.tolist())) == [0, 2, 3]


@pytest.mark.parametrize(
    "spec,per_class,batch_classes,message",
    [
        ("0.1", 4, 2, "a fraction between 0.3 and 0.69"),  # 1 of 5 classes held out
        ("0.9", 4, 2, "hold out 2 to 3 classes"),  # 1 class left to train on
        ("0,1,2", 4, 3, "hold out 2 to 2 classes"),  # a P x K batch needs 3 classes
        ("0,1", 1, 2, "two images or more"),  # single-image validation classes
        ("0,1", 4, 4, "lower batch_size // m_per_class to 3 or use val_fraction"),
        ("0,7", 4, 2, "not among the training classes"),
        ("x,y", 4, 2, "neither a fraction"),
        ("1.5", 4, 2, "in (0, 1)"),
    ],
)
def test_a_class_split_that_cannot_work_is_one_line_saying_what_would(
    spec, per_class, batch_classes, message
):
    from retrieval.training.loop import split_val_classes

    with pytest.raises(UserError) as caught:
        split_val_classes(_dataset(per_class), spec, seed=0, batch_classes=batch_classes)
    assert "\n" not in str(caught.value) and message in str(caught.value)


@pytest.mark.parametrize("fraction", ["0.3", "0.69"])
def test_the_stated_fraction_bounds_of_a_class_split_work(fraction):
    from retrieval.training.loop import split_val_classes

    _, val_set, names = split_val_classes(_dataset(4), fraction, seed=0)
    assert 2 <= len(names) <= 3


def test_val_fraction_and_val_classes_together_are_refused(digits_folder, tmp_path, capsys):
    code, _, err = run_cli(
        ["train", "--data", digits_folder, "--val-fraction", "0.2", "--val-classes", "0.2"]
        + ["--device", "cpu", "--out", tmp_path / "run"],
        capsys,
    )
    assert code == 2 and "Traceback" not in err
    assert "not both" in " ".join(err.split())


def test_the_default_validation_split_holds_out_a_tenth_of_the_images():
    cfg = TrainConfig()
    assert cfg.image_val_fraction() == 0.1 and cfg.val_classes is None
    assert TrainConfig(val_classes="0.2").image_val_fraction() == 0.0


# ------------------------------------------------------------------------- collapse check


def _embeddings_with_mean_cosine(target: float, n: int = 300, dim: int = 32) -> np.ndarray:
    """Unit vectors around a common direction; their mean pairwise cosine is near ``target``."""
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((n, dim))
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    common = np.zeros(dim)
    common[0] = 1.0
    spread = np.sqrt((1 - target) / target)  # cos ~ 1 / (1 + spread^2) for random noise
    emb = common + spread * noise
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def test_embeddings_close_to_one_direction_are_reported_with_the_figure(caplog):
    from retrieval.training.loop import _collapse_check

    emb = _embeddings_with_mean_cosine(0.97)
    with caplog.at_level("WARNING", logger="retrieval.training.loop"):
        out = _collapse_check(emb, epoch=1, seed=0)
    assert out["val_mean_cosine"] == pytest.approx(0.97, abs=0.01)
    assert out["collapsed"] is True
    assert f"{out['val_mean_cosine']:.3f}" in caplog.text and "learning rate" in caplog.text


def test_spread_embeddings_are_not_reported(caplog):
    from retrieval.training.loop import _collapse_check

    with caplog.at_level("WARNING", logger="retrieval.training.loop"):
        out = _collapse_check(_embeddings_with_mean_cosine(0.5), epoch=1, seed=0)
    assert out["val_mean_cosine"] == pytest.approx(0.5, abs=0.03)
    assert "collapsed" not in out and not caplog.text


# ---------------------------------------------------------------------- untrained baseline


def test_the_untrained_network_is_reported_before_the_first_epoch(digits_folder, tmp_path):
    from retrieval.evaluation.evaluate import evaluate_embeddings
    from retrieval.model.checkpoint import load_checkpoint
    from retrieval.model.embed import embed_dataset
    from retrieval.training.distributed import Processes
    from retrieval.training.loop import build_network, prepare_data, seed_everything

    cfg = _cfg(digits_folder, tmp_path / "run", classes="0-9", val_fraction=None)
    cfg.val_classes = "3,7"
    reported = []
    summary = train(cfg, on_epoch=reported.append)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert reported[0] == first and [r["epoch"] for r in reported] == [0, 1]
    assert first["baseline"] is True and "loss" not in first
    assert first["val_classes"] == ["digit3", "digit7"]
    assert summary["epoch"] == 1  # reported, never selected
    assert (
        load_checkpoint(tmp_path / "run" / "best.pt")["validation_classes"] == first["val_classes"]
    )
    # the same figure as scoring the freshly built network on the held-out classes
    seed_everything(cfg.seed)
    procs = Processes.current(torch.device("cpu"))
    data = prepare_data(cfg, procs)
    net, _ = build_network(cfg, data, procs)
    scores = evaluate_embeddings(embed_dataset(net, data.val), data.val.labels, ks=(1,))
    assert first["val_map@r"] == pytest.approx(scores["map@r"])
    assert first["val_recall@1"] == pytest.approx(scores["recall@1"])


def test_the_baseline_leaves_the_training_numbers_unchanged(digits_folder, tmp_path, monkeypatch):
    import retrieval.training.loop as loop

    train(_cfg(digits_folder, tmp_path / "a"))
    real = loop.evaluate

    def no_baseline(net, ds, procs, epoch, seed):
        return {} if epoch == 0 else real(net, ds, procs, epoch, seed)

    monkeypatch.setattr(loop, "evaluate", no_baseline)
    train(_cfg(digits_folder, tmp_path / "b"))
    a, b = (torch.load(tmp_path / n / "last.pt", weights_only=True)["model"] for n in "ab")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
