"""The training loop: repeatable, validated, and safe on a bad loss."""

from __future__ import annotations

import json

import pytest
import torch

from retrieval.errors import UserError
from retrieval.train import TrainConfig, channel_stats, train
from data.datasets import open_source


def _cfg(digits_folder, out, **kw) -> TrainConfig:
    base = dict(data=str(digits_folder), classes="0-4", epochs=1, batch_size=40, m_per_class=8,
                image_size=12, device="cpu", out=str(out), val_fraction=0.2)
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
    import retrieval.train as train_module

    real = train_module.pml_losses.TripletMarginLoss

    class Exploding(real):
        def forward(self, *args, **kwargs):
            calls["n"] += 1
            loss = super().forward(*args, **kwargs)
            steps_per_epoch = 160 // 40  # 200 images of 5 classes, 20% held out
            return loss * float("nan") if calls["n"] > steps_per_epoch else loss

    monkeypatch.setattr(train_module.pml_losses, "TripletMarginLoss", Exploding)
    with pytest.raises(UserError, match="loss became nan at epoch 2"):
        train(cfg)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"batch_size": 30, "m_per_class": 8}, "multiple of m_per_class"),
        ({"batch_size": 8, "m_per_class": 8}, "at least two classes"),
        ({"batch_size": 48, "m_per_class": 8}, "needs 6 classes"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"embedding": "logits"}, "embedding must be one of"),
        ({"arch": "vgg"}, "unknown backbone"),
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
