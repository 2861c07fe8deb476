"""Training an embedding network with a metric-learning loss on m-per-class batches.

The run folder holds ``config.yaml`` (the resolved configuration), ``metrics.jsonl`` (one line
per epoch), ``last.pt`` (every epoch) and ``best.pt`` (best validation MAP@R) — all written
atomically, so a crash never leaves a torn file.

Model selection uses a validation split held out of the *seen* classes' training images; the
classes used for the final evaluation are never looked at during training.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import yaml
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.samplers import MPerClassSampler
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader

from data.datasets import ImageDataset, open_source, parse_classes
from data.transforms import DEFAULT_IMAGE_SIZE, eval_transform, train_transform
from retrieval.atomic import write_text
from retrieval.checkpoint import save_checkpoint
from retrieval.embed import embed_dataset, pick_device
from retrieval.errors import UserError
from retrieval.evaluate import evaluate_embeddings
from retrieval.models import BACKBONES, DEFAULT_EMBEDDING_DIM, EMBEDDINGS, build_model

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``config.yaml`` in the run folder."""

    data: str = "fashion-mnist"  #: source (see data.datasets.open_source)
    data_root: str | None = None  #: folder of the built-in dataset, when not the default
    split: str | None = None  #: split of the source (built-in: train)
    classes: str | None = "0-4"  #: seen classes used for training ('' = all)
    val_fraction: float = 0.1  #: share of the seen classes' images held out for validation
    arch: str = "small"  #: backbone (retrieval.models.BACKBONES)
    embedding_dim: int = DEFAULT_EMBEDDING_DIM  #: length of the embedding head's output
    embedding: str = "head"  #: what is indexed: head | features (see retrieval.models)
    image_size: int = DEFAULT_IMAGE_SIZE  #: side of the square model input, pixels
    epochs: int = 3
    batch_size: int = 128  #: images per batch (P classes x K images)
    m_per_class: int = 32  #: K, images of each class in a batch
    lr: float = 3e-4  #: Adam learning rate
    weight_decay: float = 0.0
    margin: float = 0.2  #: triplet margin, in cosine distance units
    augment: bool = True  #: random resized crop + horizontal flip
    seed: int = 0
    device: str = "auto"  #: auto | cpu | cuda | mps
    num_workers: int = 0  #: DataLoader worker processes
    out: str = "runs/train"  #: run folder

    def validate(self) -> None:
        """Raise :class:`UserError` on values that cannot work."""
        positive = ("embedding_dim", "image_size", "epochs", "batch_size", "m_per_class")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.m_per_class:
            raise UserError(
                f"batch_size ({self.batch_size}) must be a multiple of m_per_class "
                f"({self.m_per_class})"
            )
        if self.batch_size // self.m_per_class < 2:
            raise UserError("a batch needs at least two classes: batch_size >= 2 * m_per_class")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        if self.embedding not in EMBEDDINGS:
            raise UserError(f"embedding must be one of {', '.join(EMBEDDINGS)}, "
                            f"got {self.embedding!r}")
        if self.arch not in BACKBONES:
            raise UserError(f"unknown backbone {self.arch!r}; choose one of "
                            f"{', '.join(sorted(BACKBONES))}")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown configuration keys {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass
class StepInfo:
    epoch: int
    step: int
    steps: int
    loss: float
    images_per_s: float


ProgressFn = Callable[[StepInfo], None]
EpochFn = Callable[[dict], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def channel_stats(dataset: ImageDataset, max_images: int = 2000, seed: int = 0) -> tuple[list, list]:
    """Per-channel mean and std of the raw pixels (scaled to [0, 1]) on a sample of images."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(dataset), size=min(max_images, len(dataset)), replace=False)
    sums, sq, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    for i in pick:
        img = dataset.image(int(i)).double() / 255.0
        sums += img.sum(dim=(1, 2))
        sq += (img**2).sum(dim=(1, 2))
        count += img.shape[1] * img.shape[2]
    mean = sums / count
    std = (sq / count - mean**2).clamp_min(1e-12).sqrt()
    return [round(float(m), 4) for m in mean], [round(max(float(s), 1e-3), 4) for s in std]


def split_train_val(dataset: ImageDataset, fraction: float, seed: int
                    ) -> tuple[ImageDataset, ImageDataset | None]:
    """Stratified hold-out of ``fraction`` of the images of every class."""
    if fraction == 0:
        return dataset, None
    labels = dataset.labels
    counts = np.bincount(labels)
    if counts[counts > 0].min() < 2:
        raise UserError("every class needs at least two images to hold some out for validation")
    pos = np.arange(len(dataset))
    tr, va = train_test_split(pos, test_size=fraction, stratify=labels, random_state=seed)
    return dataset.subset(np.sort(tr)), dataset.subset(np.sort(va))


def load_training_data(cfg: TrainConfig) -> ImageDataset:
    """The seen-class training images named by the configuration."""
    split = cfg.split if cfg.split is not None else None
    dataset = open_source(cfg.data, split=split, root=cfg.data_root, draft_size=cfg.image_size)
    dataset = dataset.filter_classes(parse_classes(cfg.classes))
    n_classes = len(np.unique(dataset.labels))
    if n_classes < 2:
        raise UserError(f"training needs at least two classes, the data has {n_classes}")
    return dataset


def train(
    cfg: TrainConfig,
    on_step: ProgressFn | None = None,
    on_epoch: EpochFn | None = None,
) -> dict:
    """Train a model as configured; returns the summary of the best epoch.

    Args:
        cfg: the configuration.
        on_step: called after every optimisation step (progress bars).
        on_epoch: called after every epoch with its metrics.
    """
    cfg.validate()
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)

    full = load_training_data(cfg)
    train_set, val_set = split_train_val(full, cfg.val_fraction, cfg.seed)
    mean, std = channel_stats(train_set, seed=cfg.seed)
    train_set = train_set.with_transform(train_transform(cfg.image_size, mean, std, cfg.augment))
    if val_set is not None:
        val_set = val_set.with_transform(eval_transform(cfg.image_size, mean, std))
    labels = train_set.labels
    n_classes = len(np.unique(labels))
    m = cfg.m_per_class
    if cfg.batch_size // m > n_classes:
        raise UserError(
            f"a batch of {cfg.batch_size} with {m} per class needs {cfg.batch_size // m} classes, "
            f"the data has {n_classes}; lower batch_size or raise m_per_class"
        )

    model = build_model(cfg.arch, cfg.embedding_dim, cfg.embedding).to(device)
    model_config = {
        "arch": cfg.arch,
        "head_dim": cfg.embedding_dim,
        "embedding": cfg.embedding,
        "embedding_dim": model.output_dim,
        "image_size": cfg.image_size,
        "mean": mean,
        "std": std,
    }
    loss_fn = pml_losses.TripletMarginLoss(margin=cfg.margin)
    miner = pml_miners.TripletMarginMiner(margin=cfg.margin, type_of_triplets="semihard")
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    steps = len(train_set) // cfg.batch_size
    if steps == 0:
        raise UserError(f"{len(train_set)} training images are fewer than one batch of {cfg.batch_size}")
    sampler = MPerClassSampler(labels, m, batch_size=cfg.batch_size,
                               length_before_new_iter=steps * cfg.batch_size)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda")

    resolved = asdict(cfg) | {"mean": mean, "std": std, "device": str(device)}
    write_text(run / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    class_names = full.class_names
    log_path = run / "metrics.jsonl"
    log_path.unlink(missing_ok=True)
    best: dict = {}

    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0, seen, total = time.perf_counter(), 0, 0.0
        for step, (images, targets) in enumerate(loader, start=1):
            images, targets = images.to(device, non_blocking=True), targets.to(device)
            emb = model.head_embedding(images)  # (batch, embedding_dim): what the loss sees
            loss = loss_fn(emb, targets, miner(emb, targets))
            if not torch.isfinite(loss):
                raise UserError(
                    f"the loss became {loss.item()} at epoch {epoch}, step {step}; lower the "
                    f"learning rate (now {cfg.lr}). The last good checkpoint is kept in {run}."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(images)
            total += loss.item()
            if on_step is not None:
                on_step(StepInfo(epoch, step, steps, loss.item(),
                                 seen / max(time.perf_counter() - t0, 1e-9)))
        record = {
            "epoch": epoch,
            "loss": total / steps,
            "images_per_s": seen / (time.perf_counter() - t0),
        }
        if val_set is not None:
            val_emb = embed_dataset(model, val_set, device=device)
            scores = evaluate_embeddings(val_emb, val_set.labels, ks=(1,))
            record["val_recall@1"] = scores["recall@1"]
            record["val_map@r"] = scores["map@r"]
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        entries = {"config": resolved, "class_names": class_names, "epoch": epoch,
                   "metrics": record}
        save_checkpoint(run / "last.pt", model, model_config, **entries)
        score = record.get("val_map@r", -record["loss"])
        if not best or score > best["score"] or math.isnan(best["score"]):
            best = {"score": score, **record}
            save_checkpoint(run / "best.pt", model, model_config, **entries)
        if on_epoch is not None:
            on_epoch(record)
    return {"run": str(run), "best_checkpoint": str(run / "best.pt"), **best}
