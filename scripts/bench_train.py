"""Training throughput: ``retrieval.training.loop`` against a plain pytorch-metric-learning loop.

Both train the same model (the small convnet) with the same loss (triplet, margin 0.2), miner
(semi-hard), optimizer (Adam) and P x K batches on the same number of images, in one process;
each phase times its last epoch (the first warms up). The phases run interleaved A B B A
(``--repeats 2``; A B B A A B B A with 4...), so a load that rises or falls steadily on a shared
machine weighs on both alike; prints images/s of every phase, the load average around it, and
the ratio of the medians, ``retrieval train`` / plain loop (target >= 0.95).

``--pretrained`` measures the fine-tuning recipe instead (``retrieval.training.recipe``):
EfficientNet-Lite0 from its ImageNet weights at the recipe's image size, augmentation, the head
and the backbone at their own learning rates, BatchNorm statistics frozen; the plain loop does
the same in a few textbook lines.

    python scripts/bench_train.py --data-root /usr/share/datasets/fashion-mnist --images 6400
    python scripts/bench_train.py --pretrained --images 640 --batch-size 64 --m-per-class 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import asdict

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
    p.add_argument(
        "--repeats", type=int, default=2, help="phases of each loop, interleaved A B B A ..."
    )
    p.add_argument(
        "--pretrained", action="store_true", help="the fine-tuning recipe (EfficientNet-Lite0)"
    )
    return p


def plain_pretrained_setup(args: argparse.Namespace):
    """The recipe's model, data and optimizer, written out as a textbook loop would."""
    from retrieval.model.pretrained import input_norm, load_pretrained
    from retrieval.training.recipe import PRETRAINED_RECIPE as R

    size = R["image_size"]
    mean, std = input_norm(R["arch"])
    data = load_builtin("train", args.data_root).filter_classes(range(5))
    data = data.with_transform(train_transform(size, mean, std, augment=R["augment"]))
    weights = load_pretrained(R["arch"], "imagenet")
    model = build_model(
        R["arch"], 128, "features", stem="imagenet", image_size=size, weights=weights
    )
    groups = [
        {"params": list(model.head.parameters()), "lr": R["lr"]},
        {"params": list(model.backbone.parameters()), "lr": R["backbone_lr"]},
    ]
    return data, model, torch.optim.Adam(groups)


def _freeze_bn(model: torch.nn.Module) -> None:
    for m in model.backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()


def plain_loop(args: argparse.Namespace) -> float:
    """Images/s of a textbook PML loop (last epoch)."""
    seed_everything(0)
    if args.pretrained:
        data, model, opt = plain_pretrained_setup(args)
    else:
        data = load_builtin("train", args.data_root).filter_classes(range(5))
        mean, std = channel_stats(data)
        data = data.with_transform(train_transform(28, mean, std, augment=False))
        model = build_model("small", 128, "features")
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = pml_losses.TripletMarginLoss(margin=0.2)
    miner = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
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
        if args.pretrained:
            _freeze_bn(model)
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
        if args.pretrained:
            from retrieval.training.recipe import PRETRAINED_RECIPE

            keep = {"epochs", "batch_size", "m_per_class"}
            recipe = {k: v for k, v in PRETRAINED_RECIPE.items() if k not in keep}
            cfg = TrainConfig.from_dict(asdict(cfg) | recipe)
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


def phase_order(repeats: int) -> list[str]:
    """``plain`` and ``ours`` interleaved A B B A A B B A ...: a linear drift of the machine's
    speed cancels out of every A B B A block.

    Example:
        >>> phase_order(3)
        ['plain', 'ours', 'ours', 'plain', 'plain', 'ours']
    """
    block = ["plain", "ours", "ours", "plain"]
    return [block[i % 4] for i in range(2 * repeats)]


def main(args: argparse.Namespace) -> None:
    phases = {"plain": plain_loop, "ours": framework}
    rates: dict[str, list[float]] = {"plain": [], "ours": []}
    for name in phase_order(args.repeats):
        load = os.getloadavg()[0]
        rate = phases[name](args)
        rates[name].append(rate)
        label = "plain PML loop" if name == "plain" else "retrieval train"
        print(
            f"{label + ':':17s} {rate:8.1f} images/s  (load average {load:.1f} -> "
            f"{os.getloadavg()[0]:.1f})",
            flush=True,
        )
    plain, ours = statistics.median(rates["plain"]), statistics.median(rates["ours"])
    print(f"median plain:     {plain:8.1f} images/s")
    print(f"median ours:      {ours:8.1f} images/s")
    print(f"ratio:            {ours / plain:8.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
