"""The embedding pipeline: workers, memory layout, progress, and the benchmark at a small size."""

from __future__ import annotations

import argparse
import importlib.util

import numpy as np
import pytest
import torch

from data.datasets import ArrayStore, ImageDataset
from data.errors import DataError
from retrieval.model.embed import (
    EmbedProgress,
    default_num_workers,
    embed_dataset,
    embed_images,
    uses_channels_last,
)
from retrieval.model.networks import build_model
from retrieval.model.spec import Preprocessing
from tests.conftest import REPO
from tests.retrieval.model.conftest import file_dataset

PREPROCESSING = Preprocessing(48, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.fixture
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("small", 16, "features", image_size=48).eval()


def test_workers_and_channels_last_give_the_same_vectors(photos, net):
    dataset = file_dataset(photos, PREPROCESSING.transform(), draft_size=48)
    plain = embed_dataset(net, dataset, batch_size=5, num_workers=0, channels_last=False)
    fast = embed_dataset(net, dataset, batch_size=5, num_workers=2, channels_last=True)
    assert plain.shape == (len(photos), net.output_dim) and plain.dtype == np.float32
    np.testing.assert_allclose(fast, plain, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(plain, axis=1), 1.0, atol=1e-5)
    # the model is given back as it came: layout and mode
    assert not uses_channels_last(net) and not net.training
    net.train()
    embed_dataset(net, dataset, batch_size=5, num_workers=0)
    assert net.training and not uses_channels_last(net)  # a model in training is not converted
    # one query batch through the same layout as the model's
    batch = torch.stack([dataset[i][0] for i in range(3)])
    net.eval().to(memory_format=torch.channels_last)
    np.testing.assert_allclose(embed_images(net, batch), plain[:3], atol=1e-5)


def test_progress_counts_images_and_rate(photos, net):
    dataset = file_dataset(photos, PREPROCESSING.transform(), draft_size=48)
    seen: list[EmbedProgress] = []
    counts: list[int] = []
    embed_dataset(net, dataset, batch_size=5, on_progress=seen.append, on_batch=counts.append)
    assert [p.done for p in seen] == [5, 10, 12] and counts == [5, 5, 2]
    assert all(p.total == 12 and p.images_per_second > 0 for p in seen)
    assert seen[-1].eta_seconds == 0 and seen[0].eta_seconds > 0


def test_worker_count_follows_where_images_come_from(photos):
    in_memory = ImageDataset(
        ArrayStore(np.zeros((10, 8, 8), np.uint8)), np.zeros(10), ["x"] * 10, ["a"]
    )
    assert default_num_workers(in_memory) == 0
    assert default_num_workers(file_dataset(photos)) >= 1
    assert default_num_workers(file_dataset(photos[:1])) == 0
    empty = embed_dataset(build_model("small", 8, "features"), in_memory.subset([]))
    assert empty.shape == (0, build_model("small", 8, "features").output_dim)


def test_the_benchmark_runs_at_a_small_size(tmp_path):
    """scripts/bench_embed.py end to end on a few small photos: the library's vectors equal the
    bare loop's (its speed figure is the benchmark's to assert, not this test's)."""
    spec = importlib.util.spec_from_file_location("bench_embed", REPO / "scripts/bench_embed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.get_args_parser().parse_args(
        ["--images", "6", "--width", "160", "--height", "120", "--image-size", "64"]
        + ["--repeats", "1", "--workers", "1", "--json", str(tmp_path / "b.json")]
    )
    assert isinstance(args, argparse.Namespace)
    result = bench.main(args)
    assert result["images"] == 6 and result["workers"] == 1 and result["image_size"] == 64
    assert result["max_difference"] <= bench.TOLERANCE
    assert result["bare_images_per_s"] > 0 and result["library_images_per_s"] > 0
    assert (tmp_path / "b.json").is_file()


def test_an_image_that_fails_in_a_worker_raises_the_same_one_line_error(photos, net):
    broken = photos[0].parent / "broken.jpg"
    broken.write_bytes(photos[0].read_bytes()[:300])  # truncated after listing
    dataset = file_dataset([*photos[:3], broken], PREPROCESSING.transform(), draft_size=48)
    with pytest.raises(DataError) as in_process:
        embed_dataset(net, dataset, batch_size=2, num_workers=0)
    with pytest.raises(DataError) as in_worker:
        embed_dataset(net, dataset, batch_size=2, num_workers=1)
    assert str(in_worker.value) == str(in_process.value)
    assert "broken.jpg" in str(in_worker.value) and "Traceback" not in str(in_worker.value)
