"""Training throughput: ``retrieval.training.loop`` against a plain pytorch-metric-learning loop.

Both train the same model (the small convnet) with the same loss (triplet, margin 0.2), miner
(semi-hard), optimizer (Adam) and P x K batches on the same images, one after the other in one
process; prints images/s of each and the ratio (target >= 0.95).

    python scripts/bench_train.py --data-root /usr/share/datasets/fashion-mnist --images 6400
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.samplers import MPerClassSampler
from torch.utils.data import DataLoader

from data.datasets import load_builtin
from data.transforms import train_transform
from retrieval.model.networks import build_model
from retrieval.training.loop import TrainConfig, channel_stats, seed_everything, train


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--images", type=int, default=6400, help="training images per epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--m-per-class", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2, help="the first is a warm-up, not timed")
    return p


def plain_loop(args: argparse.Namespace) -> float:
    """Images/s of a textbook PML loop (last epoch)."""
    seed_everything(0)
    data = load_builtin("train", args.data_root).filter_classes(range(5))
    mean, std = channel_stats(data)
    data = data.with_transform(train_transform(28, mean, std, augment=False))
    model = build_model("small", 128, "features")
    loss_fn = pml_losses.TripletMarginLoss(margin=0.2)
    miner = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    steps = args.images // args.batch_size
    sampler = MPerClassSampler(
        data.labels,
        args.m_per_class,
        batch_size=args.batch_size,
        length_before_new_iter=steps * args.batch_size,
    )
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    rate = 0.0
    for _ in range(args.epochs):
        model.train()
        t0, seen = time.perf_counter(), 0
        for images, labels in loader:
            emb = model.head_embedding(images)
            loss = loss_fn(emb, labels, miner(emb, labels))
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(images)
        rate = seen / (time.perf_counter() - t0)
    return rate


def framework(args: argparse.Namespace) -> float:
    """Images/s of ``retrieval.training.loop`` on the same work (last epoch, validation not
    timed)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            data="fashion-mnist",
            data_root=args.data_root,
            classes="0-4",
            val_fraction=0.0,
            embedding="features",
            lr=1e-4,
            augment=False,
            epochs=args.epochs,
            batch_size=args.batch_size,
            m_per_class=args.m_per_class,
            device="cpu",
            out=out,
        )
        records: list[dict] = []
        # the same number of steps per epoch as the plain loop
        import retrieval.training.loop as train_module

        real = train_module.load_training_data

        def limited(c: TrainConfig):
            ds = real(c)
            pick = np.random.default_rng(0).permutation(len(ds))[: args.images]
            return ds.subset(np.sort(pick))

        train_module.load_training_data = limited
        try:
            train(cfg, on_epoch=records.append)
        finally:
            train_module.load_training_data = real
        return records[-1]["images_per_s"]


def main(args: argparse.Namespace) -> None:
    plain = plain_loop(args)
    ours = framework(args)
    print(f"plain PML loop:   {plain:8.1f} images/s")
    print(f"retrieval train:  {ours:8.1f} images/s")
    print(f"ratio:            {ours / plain:8.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
