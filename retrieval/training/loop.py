"""Training an embedding network with a metric-learning loss on m-per-class batches.

Read top to bottom as torchvision's ``references/classification/train.py``: :func:`train`
composes; :func:`prepare_data`, :func:`build_network`, :func:`build_objective_for` and
:func:`build_optimiser` set the run up; :func:`train_one_epoch` runs the optimisation steps of an
epoch, :func:`evaluate` scores the validation split; :func:`restore` and :func:`save_epoch`
are the resume and checkpoint halves of the run folder.

The run folder holds ``config.yaml`` (the resolved configuration), ``metrics.jsonl`` (one line
per epoch, after an epoch-0 line of the untrained network's validation scores), ``curves.png``
(loss and validation curves), ``last.pt`` (every epoch: model, optimizer, scheduler, loss
parameters, AMP scaler, RNG and sampler state, epoch, best score) and ``best.pt`` (best
validation MAP@R) — all written atomically, so a crash never leaves a torn
file, and ``train(cfg, resume=True)`` continues from ``last.pt`` exactly where it stopped.

Model selection uses a validation split of the *seen* classes' training data: images of every
class (``val_fraction``, closed-set), or whole classes never trained on (``val_classes``, which
rewards what transfers to unseen classes). The classes used for the final evaluation are never
looked at during training.

The loss and its miner come from :mod:`retrieval.training.objectives`; the backbone from
:mod:`retrieval.model.networks`, its pretrained weights from
:mod:`retrieval.model.pretrained`; the learning rate follows :mod:`retrieval.training.schedule`.

Under ``torchrun --nproc_per_node N -m retrieval train ...`` the N processes train one model
together: ``batch_size`` stays the global batch, miners and losses see all of it, and only rank
0 writes the run folder. Every collective goes through one
:class:`~retrieval.training.distributed.Processes` object, whose methods return at once on a
single process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pytorch_metric_learning.samplers import MPerClassSampler
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader

from data.datasets import ImageDataset, open_source, parse_classes
from data.errors import DataError
from data.transforms import eval_transform, train_transform
from retrieval.atomic import write_text
from retrieval.errors import UserError
from retrieval.evaluation.evaluate import evaluate_embeddings
from retrieval.model.checkpoint import load_checkpoint, save_checkpoint
from retrieval.model.embed import pick_device
from retrieval.model.networks import EmbeddingNet, build_model
from retrieval.model.pretrained import input_norm, load_pretrained
from retrieval.model.spec import ModelConfig
from retrieval.training import rng as rng_state
from retrieval.training.config import RESUME_OVERRIDABLE, TrainConfig
from retrieval.training.curves import training_curves
from retrieval.training.distributed import (
    HeadEmbedding,
    Processes,
    join,
    rank_from_env,
    shared_randomness,
)
from retrieval.training.objectives import Objective, build_objective, pair_cosine
from retrieval.training.schedule import lr_factor

__all__ = [
    "RESUME_OVERRIDABLE",
    "StepInfo",
    "TrainConfig",
    "backward_step",
    "channel_stats",
    "evaluate",
    "load_run_config",
    "load_training_data",
    "seed_everything",
    "split_train_val",
    "train",
    "train_one_epoch",
]

logger = logging.getLogger(__name__)

#: Mean pairwise cosine of the validation embeddings above which they count as collapsed: at
#: .968 (one epoch of triplet loss, 32-d head, 300 Fashion-MNIST images) resized copies of
#: gallery images found their own original first only 53% of the time.
COLLAPSE_COSINE = 0.9
#: Validation embeddings used for the collapse check.
COLLAPSE_SAMPLE = 1000


@dataclass
class StepInfo:
    epoch: int
    step: int
    steps: int
    loss: float
    images_per_s: float
    lr: float = 0.0  #: learning rate of the step


ProgressFn = Callable[[StepInfo], None]
EpochFn = Callable[[dict], None]


# ----------------------------------------------------------------------------------- entry


def train(
    cfg: TrainConfig,
    on_step: ProgressFn | None = None,
    on_epoch: EpochFn | None = None,
    resume: bool = False,
) -> dict:
    """Train a model as configured; returns the summary of the best epoch.

    Args:
        cfg: the configuration.
        on_step: called after every optimisation step (progress bars).
        on_epoch: called after every epoch with its metrics.
        resume: continue the run in ``cfg.out`` from its ``last.pt`` (same configuration, except
            ``RESUME_OVERRIDABLE``) instead of starting afresh.

    Returns:
        ``run``, ``best_checkpoint``, ``epochs_run`` (last epoch trained), ``stopped_early`` and
        the best epoch's record (``epoch``, ``loss``, validation metrics...).

    Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set) every process calls this; they join a
    process group (gloo on CPU, nccl on CUDA), each loads ``batch_size / WORLD_SIZE`` images of
    every global batch, only rank 0 writes files and calls ``on_step`` / ``on_epoch``, and every
    rank returns the summary.
    """
    cfg.validate()
    rank = rank_from_env()
    if cfg.batch_size % rank.world_size:
        raise UserError(
            f"batch_size ({cfg.batch_size}) is the global batch and must split evenly over the "
            f"{rank.world_size} processes"
        )
    with join(rank, pick_device(cfg.device)) as procs:
        run = Path(cfg.out)
        saved = _resume_state(run, cfg) if resume else None
        seed_everything(cfg.seed + rank.rank)  # the ranks augment differently; DDP syncs the model
        if procs.is_main:
            run.mkdir(parents=True, exist_ok=True)

        data = prepare_data(cfg, procs)
        net, model_config = build_network(cfg, data, procs, pretrained=saved is None)
        objective = build_objective_for(cfg, data, procs)
        learner = build_optimiser(cfg, net, objective, data.steps, procs.device)
        resolved = asdict(cfg) | {
            "mean": data.mean,
            "std": data.std,
            "device": str(procs.device),
            "miner": objective.miner_name,
            "processes": procs.world_size,
            "validation_classes": data.val_classes,  # held out whole; [] for an image split
        }
        if procs.is_main:
            write_text(run / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        history, first_epoch = History(), 1
        if saved is not None:
            history, first_epoch = restore(saved, learner, data.sampler, procs)
            if procs.is_main:
                logger.info("resuming %s at epoch %d", run, first_epoch)
        if saved is None and data.val is not None:  # where the run starts from
            before = rng_state.capture()  # embedding draws loader seeds: keep training's
            baseline = evaluate(net, data.val, procs, 0, cfg.seed)
            rng_state.restore(before)
            if procs.is_main:
                # a pretrained start is a candidate: best.pt never ends worse than the start
                selectable = cfg.pretrained is not None and "val_map@r" in baseline
                history.add_baseline(
                    {"epoch": 0, "baseline": True, **baseline}
                    | ({"val_classes": data.val_classes} if data.val_classes else {}),
                    selectable=selectable,
                )
                if selectable:
                    save_start(run, learner, model_config, resolved, data, history)
                if on_epoch is not None:
                    on_epoch(history.records[-1])
        if procs.is_main:
            _write_metrics(run, history.records)
        learner = dataclasses.replace(learner, trainee=procs.wrap(learner.trainee))

        stopped_early = False
        for epoch in range(first_epoch, cfg.epochs + 1):
            record = train_one_epoch(learner, data.loader, cfg, epoch, procs, on_step)
            if data.val is not None:
                record |= evaluate(net, data.val, procs, epoch, cfg.seed)
            rngs = procs.gather_objects(rng_state.capture())  # every rank's, for an exact resume
            if procs.is_main:
                improved = history.add(record)
                stopped_early = history.should_stop(cfg.patience) and epoch < cfg.epochs
                save_epoch(run, cfg, learner, model_config, resolved, data, history, improved, rngs)
                if on_epoch is not None:
                    on_epoch(record)
            if procs.broadcast(stopped_early):
                stopped_early = True
                if procs.is_main:
                    logger.info(
                        "early stop at epoch %d: no better val MAP@R for %d epochs",
                        epoch,
                        cfg.patience,
                    )
                break
        if procs.is_main and history.records:
            training_curves(history.records, run / "curves.png")
        summary = {
            "run": str(run),
            "best_checkpoint": str(run / "best.pt"),
            "epochs_run": history.records[-1]["epoch"] if history.records else 0,
            "stopped_early": stopped_early,
            **history.best,
        }
        return procs.broadcast(summary)  # rank 0 knows the history


# ----------------------------------------------------------------------------------- data


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def channel_stats(
    dataset: ImageDataset, max_images: int = 2000, seed: int = 0
) -> tuple[list, list]:
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


def split_train_val(
    dataset: ImageDataset, fraction: float, seed: int
) -> tuple[ImageDataset, ImageDataset | None]:
    """Stratified hold-out of ``fraction`` of the images of every class.

    Raises:
        UserError: a class with a single image, or a ``fraction`` that cannot keep at least one
            image of every class on both sides (the message gives the fractions that can).
    """
    if fraction == 0:
        return dataset, None
    labels = dataset.labels
    counts = np.bincount(labels)
    if counts[counts > 0].min() < 2:
        raise UserError("every class needs at least two images to hold some out for validation")
    _check_holdout(len(labels), int((counts > 0).sum()), fraction)
    pos = np.arange(len(dataset))
    tr, va = train_test_split(pos, test_size=fraction, stratify=labels, random_state=seed)
    return dataset.subset(np.sort(tr)), dataset.subset(np.sort(va))


def split_val_classes(
    dataset: ImageDataset, spec: str, seed: int, batch_classes: int = 2
) -> tuple[ImageDataset, ImageDataset, list[str]]:
    """Hold out whole classes for validation: ``spec`` is a fraction of the classes with a
    decimal point (``'0.2'``, the classes drawn with ``seed``) or a list of class indices or
    names (``'3,7'``, ``'5-9'``, ``'cat,dog'``).

    Args:
        batch_classes: classes a P x K batch needs (``batch_size // m_per_class``); the training
            side keeps at least that many, and at least two.

    Returns:
        The training images, the validation images and the names of the held-out classes.

    Raises:
        UserError: an unknown class, or a split that leaves fewer than ``batch_classes`` training
            classes or fewer than two validation classes of two images or more (the message
            says which split would work).
    """
    counts = np.bincount(dataset.labels, minlength=len(dataset.class_names))
    present = [int(c) for c in np.flatnonzero(counts)]
    n = len(present)
    need_train = max(2, batch_classes)
    text = spec.strip()
    if "." in text:
        try:
            fraction = float(text)
        except ValueError:
            fraction = -1.0
        if not 0.0 < fraction < 1.0:
            raise UserError(
                f"val_classes {spec!r}: a fraction of the classes is in (0, 1), e.g. 0.2"
            )
        count = math.floor(Fraction(text) * n + Fraction(1, 2))  # rounded half up, exactly
        held = sorted(int(c) for c in np.random.default_rng(seed).permutation(present)[:count])
    else:
        held = _class_list(text, dataset.class_names, present)
    usable = [c for c in held if counts[c] >= 2]
    if len(usable) < 2 or n - len(held) < need_train:
        most = n - need_train
        if most < 2:
            smaller = f"lower batch_size // m_per_class to {n - 2} or " if n >= 4 else ""
            raise UserError(
                f"val_classes {spec!r}: the data has {n} classes; holding out whole classes "
                f"needs 2 for validation and {need_train} for training (batch_size // "
                f"m_per_class = {batch_classes}); {smaller}use val_fraction instead"
            )
        # held = floor(f * n + 1/2) is in [2, most] for f in [3 / 2n, (2 most + 1) / 2n)
        low = math.ceil(Fraction(3, 2 * n) * 100) / 100
        high = (math.ceil(Fraction(2 * most + 1, 2 * n) * 100) - 1) / 100
        raise UserError(
            f"val_classes {spec!r} holds out {len(held)} of the {n} classes "
            f"({len(usable)} with two images or more); validation needs 2 classes of two "
            f"images or more and training {need_train} classes: hold out 2 to {most} classes "
            f"(a fraction between {low:g} and {high:g})"
        )
    is_held = np.isin(dataset.labels, held)
    pos = np.arange(len(dataset))
    names = [dataset.class_names[c] for c in held]
    return dataset.subset(pos[~is_held]), dataset.subset(pos[is_held]), names


def _class_list(text: str, class_names: list[str], present: list[int]) -> list[int]:
    """Class indices of a list of indices (``3,7``, ``5-9``) or names (``cat,dog``) among the
    ``present`` classes."""
    by_name = {name: i for i, name in enumerate(class_names)}
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts and all(p in by_name for p in parts):
        held = sorted({by_name[p] for p in parts})
    else:
        try:
            held = parse_classes(text) or []
        except DataError:
            raise UserError(
                f"val_classes {text!r} is neither a fraction (e.g. 0.2) nor a list of class "
                f"indices or names (e.g. 3,7); classes: {', '.join(class_names)}"
            ) from None
    missing = sorted(set(held) - set(present))
    if missing:
        raise UserError(
            f"val_classes {text!r}: classes {missing} are not among the training classes {present}"
        )
    return held


def _check_holdout(images: int, classes: int, fraction: float) -> None:
    """A stratified split holds out ``ceil(fraction * images)`` images (scikit-learn's count);
    both sides need one image of every class."""
    held = math.ceil(fraction * images)
    if classes <= held <= images - classes:
        return
    low = math.ceil(Fraction(classes, images) * 1000) / 1000
    high = math.floor(Fraction(images - classes, images) * 1000) / 1000
    works = f"of {low:g}" if low >= high else f"between {low:g} and {high:g}"
    side = (
        f"holds out {held} of the {images} images"
        if held < classes
        else f"leaves {images - held} of the {images} images for training"
    )
    raise UserError(
        f"val_fraction {fraction:g} {side}, fewer than one per class ({classes} classes); "
        f"use a val_fraction {works}, or 0 for no validation split"
    )


def load_training_data(cfg: TrainConfig) -> ImageDataset:
    """The seen-class training images named by the configuration."""
    dataset = open_source(cfg.data, split=cfg.split, root=cfg.data_root, draft_size=cfg.image_size)
    dataset = dataset.filter_classes(parse_classes(cfg.training_classes()))
    n_classes = len(np.unique(dataset.labels))
    if n_classes < 2:
        raise UserError(f"training needs at least two classes, the data has {n_classes}")
    if cfg.per_class is not None:
        dataset = at_most_per_class(dataset, cfg.per_class, cfg.seed)
    return dataset


def at_most_per_class(dataset: ImageDataset, n: int, seed: int = 0) -> ImageDataset:
    """At most ``n`` images of each class, drawn at random with ``seed`` (in dataset order)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(dataset.labels)
    keep = [
        rng.choice(where, size=n, replace=False) if len(where) > n else where
        for where in (np.flatnonzero(labels == c) for c in np.unique(labels))
    ]
    return dataset.subset(np.sort(np.concatenate(keep)))


@dataclass
class TrainingData:
    """The training and validation images of a run, and how batches of them are drawn."""

    train: ImageDataset  #: with the training transform
    val: ImageDataset | None  #: with the evaluation transform; None without a validation split
    class_names: list[str]
    mean: list[float]  #: the input normalisation
    std: list[float]
    num_classes: int  #: labels are 0 .. num_classes - 1
    steps: int  #: optimisation steps per epoch
    sampler: MPerClassSampler  #: draws the global P x K batches
    loader: DataLoader  #: this process's share of every batch
    val_classes: list[str] = field(default_factory=list)  #: names of the held-out classes


def prepare_data(cfg: TrainConfig, procs: Processes) -> TrainingData:
    """Load, split and normalise the images; the P x K sampler and this process's loader."""
    full = load_training_data(cfg)
    if cfg.val_classes:
        train_set, val_set, held = split_val_classes(
            full, cfg.val_classes, cfg.seed, cfg.batch_size // cfg.m_per_class
        )
    else:
        train_set, val_set = split_train_val(full, cfg.image_val_fraction(), cfg.seed)
        held = []
    if cfg.pretrained is not None:
        mean, std = input_norm(cfg.arch)  # what the pretrained weights expect
    else:
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
    steps = len(train_set) // cfg.batch_size
    if steps == 0:
        raise UserError(
            f"{len(train_set)} training images are fewer than one batch of {cfg.batch_size}"
        )
    sampler = MPerClassSampler(
        labels, m, batch_size=cfg.batch_size, length_before_new_iter=steps * cfg.batch_size
    )
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size // procs.world_size,
        sampler=procs.shard_batches(sampler, cfg.batch_size),
        drop_last=True,
        num_workers=cfg.num_workers,
        pin_memory=procs.device.type == "cuda",
    )
    return TrainingData(
        train_set,
        val_set,
        full.class_names,
        mean,
        std,
        int(labels.max()) + 1,
        steps,
        sampler,
        loader,
        held,
    )


# ------------------------------------------------------------------ model, loss, optimiser


def build_network(
    cfg: TrainConfig, data: TrainingData, procs: Processes, pretrained: bool = True
) -> tuple[EmbeddingNet, dict]:
    """The network on this process's device and its checkpoint ``model_config``.

    Args:
        pretrained: load ``cfg.pretrained`` weights (not when resuming: the checkpoint has them).
    """
    weights = None
    if cfg.pretrained is not None and pretrained:
        weights = load_pretrained(cfg.arch, cfg.pretrained)
    try:
        net = build_model(
            cfg.arch,
            cfg.embedding_dim,
            cfg.embedding,
            stem=cfg.stem,
            image_size=cfg.image_size,
            weights=weights,
            backbone_blocks=cfg.backbone_blocks,
            pool_grid=cfg.pool_grid,
        ).to(procs.device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if procs.several and procs.device.type == "cuda":
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # statistics of the global batch
    spec = ModelConfig(
        arch=cfg.arch,
        head_dim=cfg.embedding_dim,
        embedding=cfg.embedding,
        embedding_dim=net.output_dim,
        image_size=cfg.image_size,
        mean=tuple(data.mean),
        std=tuple(data.std),
        stem=cfg.stem,
        backbone_blocks=cfg.backbone_blocks,
        pool_grid=cfg.pool_grid,
    )
    return net, spec.as_dict()


def build_objective_for(cfg: TrainConfig, data: TrainingData, procs: Processes) -> Objective:
    """The loss and its miner; loss parameters (proxies, class weights) start as rank 0's."""
    objective = build_objective(
        cfg.loss,
        cfg.miner,
        margin=cfg.margin,
        loss_args=cfg.loss_args,
        miner_args=cfg.miner_args,
        num_classes=data.num_classes,
        embedding_size=cfg.embedding_dim,
    ).to(procs.device)
    procs.broadcast_module(objective)
    return objective


@dataclass
class Learner:
    """What the optimisation steps change, and how."""

    net: EmbeddingNet  #: the network checkpoints hold
    trainee: nn.Module  #: ``net.head_embedding`` as ``forward`` (under DDP on several processes)
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    use_amp: bool
    params: list[nn.Parameter] = field(default_factory=list)  #: the network's and the loss's


def build_optimiser(
    cfg: TrainConfig, net: EmbeddingNet, objective: Objective, steps: int, device: torch.device
) -> Learner:
    """Adam over the network's and the loss's parameters, the per-step learning-rate schedule,
    and the AMP gradient scaler (enabled on CUDA only).

    With ``cfg.backbone_lr`` the backbone is a parameter group of its own at that rate (the
    head and the loss first, at ``cfg.lr``); 0 freezes it (no gradients are computed for it)."""
    params = list(net.parameters()) + list(objective.parameters())
    if cfg.backbone_lr is None:
        groups: list = params  # one group, as runs before this option was added
    else:
        head = list(net.head.parameters()) + list(objective.parameters())
        groups = [{"params": head, "lr": cfg.lr}]
        if cfg.backbone_lr > 0:
            groups.append({"params": list(net.backbone.parameters()), "lr": cfg.backbone_lr})
        else:
            net.backbone.requires_grad_(False)
    optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(cfg.schedule, round(cfg.warmup_epochs * steps), cfg.epochs * steps)
    )
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    trainee = HeadEmbedding(net)
    return Learner(net, trainee, objective, optimizer, scheduler, scaler, use_amp, params)


# ------------------------------------------------------------------------- train, evaluate


def train_one_epoch(
    learner: Learner,
    loader: DataLoader,
    cfg: TrainConfig,
    epoch: int,
    procs: Processes,
    on_step: ProgressFn | None = None,
) -> dict:
    """One pass over ``loader``; returns the epoch's record (``epoch``, mean ``loss``, ``lr`` of
    the last step, ``images_per_s`` over all processes).

    Raises:
        UserError: the loss became NaN or infinite (nothing of that step is applied).
    """
    learner.trainee.train()
    learner.objective.train()
    if cfg.freeze_bn:
        freeze_batchnorm(learner.net.backbone)
    optimizer, scaler = learner.optimizer, learner.scaler
    report = on_step if procs.is_main else None
    steps, device, world = len(loader), procs.device, procs.world_size
    t0, seen, total, lr = time.perf_counter(), 0, 0.0, optimizer.param_groups[0]["lr"]
    for step, (images, targets) in enumerate(loader, start=1):
        images, targets = images.to(device, non_blocking=True), targets.to(device)
        optimizer.zero_grad(set_to_none=True)
        value = backward_step(
            learner.trainee,
            learner.objective,
            images,
            targets,
            scaler=scaler,
            use_amp=learner.use_amp,
            seed=_step_seed(cfg.seed, epoch, step),
            processes=procs,
        )
        if not math.isfinite(value):
            raise UserError(
                f"the loss became {value} at epoch {epoch}, step {step}; lower the learning "
                f"rate (now {cfg.lr}). The last good checkpoint is kept in {Path(cfg.out)}."
            )
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(learner.params, cfg.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)
        scaler.update()
        learner.scheduler.step()
        seen += len(images) * world
        total += value
        if report is not None:
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            report(StepInfo(epoch, step, steps, value, rate, lr))
    return {
        "epoch": epoch,
        "loss": total / steps,
        "lr": lr,  # of the epoch's last step
        "images_per_s": seen / (time.perf_counter() - t0),
    }


def freeze_batchnorm(module: nn.Module) -> None:
    """Put ``module``'s BatchNorm layers in evaluation mode: they normalise with their running
    statistics and stop updating them (their scale and shift still train)."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


def backward_step(
    trainee: nn.Module,
    objective: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    scaler: torch.amp.GradScaler,
    use_amp: bool = False,
    seed: int = 0,
    processes: Processes | None = None,
) -> float:
    """Embed this process's images, compute the loss on the global batch, back-propagate.

    Alone, the batch is ``images``; under a process group, the embeddings and labels of every
    rank (:func:`~retrieval.training.distributed.gather_batch`), and the gradients come out as
    those of the single-process loss on the global batch once DDP has averaged them
    (:mod:`retrieval.training.distributed`). Randomised miners draw from ``seed``, shared by
    the ranks.

    Args:
        processes: the run's processes; by default those of the current process group.

    Returns:
        The loss on the global batch; when it is not finite nothing is back-propagated.
    """
    device = images.device
    procs = processes if processes is not None else Processes.current(device)
    with torch.autocast(device.type, enabled=use_amp):
        emb = trainee(images)  # (batch / world, embedding_dim)
    with shared_randomness(seed, device):
        loss = objective(*procs.gather_batch(emb.float(), targets))
    value = loss.item()
    if math.isfinite(value):
        world = procs.world_size  # x world: DDP averages over the ranks
        scaler.scale(loss * world if world > 1 else loss).backward()
        procs.sync_loss_gradients(objective)
    return value


def _step_seed(seed: int, epoch: int, step: int) -> int:
    """A seed for the step's shared random draws (the same on every rank)."""
    return int(np.random.SeedSequence([seed, epoch, step]).generate_state(1)[0])


def evaluate(
    net: nn.Module, dataset: ImageDataset, procs: Processes, epoch: int, seed: int
) -> dict:
    """Validation recall@1, MAP@R and mean pairwise cosine of ``net`` on ``dataset`` (on rank 0;
    ``{}`` on the others, which embed their share)."""
    embeddings = procs.embed(net, dataset)
    if embeddings is None:
        return {}
    scores = evaluate_embeddings(embeddings, dataset.labels, ks=(1,))
    return {
        "val_recall@1": scores["recall@1"],
        "val_map@r": scores["map@r"],
        **_collapse_check(embeddings, epoch, seed),
    }


def _collapse_check(embeddings: np.ndarray, epoch: int, seed: int) -> dict:
    """Mean pairwise cosine of (a sample of) the validation embeddings; warns on a collapse
    after a training epoch (``epoch`` > 0)."""
    pick = np.random.default_rng(seed).permutation(len(embeddings))[:COLLAPSE_SAMPLE]
    cos = pair_cosine(torch.from_numpy(embeddings[np.sort(pick)]))
    out: dict[str, Any] = {"val_mean_cosine": cos}
    if cos > COLLAPSE_COSINE and epoch > 0:  # an untrained network's spread is no verdict
        out["collapsed"] = True
        logger.warning(
            "epoch %d: the validation embeddings have collapsed (mean pairwise cosine %.3f > "
            "%.2f): they point nearly the same way and retrieval suffers; try a lower learning "
            "rate, more images or epochs, a larger margin, or another loss or miner",
            epoch,
            cos,
            COLLAPSE_COSINE,
        )
    return out


# ------------------------------------------------------------------ history, resume, save


@dataclass
class History:
    """The epochs' records, the best one (by validation MAP@R, else the lowest loss) and the
    epochs since it. With a validation split the first record is the untrained network's
    (``epoch`` 0, ``baseline``), so every run shows whether it beats its start."""

    records: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)  #: ``score`` and the best epoch's record
    bad_epochs: int = 0

    def add_baseline(self, record: dict, selectable: bool = False) -> None:
        """Append the starting network's record (epoch 0). Reported; the best so far only when
        ``selectable`` (a pretrained start, which a later epoch must beat to replace)."""
        self.records.append(record)
        if selectable:
            self.best = {"score": record["val_map@r"], **record}

    def add(self, record: dict) -> bool:
        """Append an epoch's record; True when it is the best so far."""
        self.records.append(record)
        score = record.get("val_map@r", -record["loss"])
        improved = not self.best or score > self.best["score"] or math.isnan(self.best["score"])
        if improved:
            self.best, self.bad_epochs = {"score": score, **record}, 0
        else:
            self.bad_epochs += 1
        return improved

    def should_stop(self, patience: int) -> bool:
        """``patience`` epochs without a better one (never when ``patience`` is 0)."""
        return patience > 0 and self.bad_epochs >= patience


def _write_metrics(run: Path, records: list[dict]) -> None:
    write_text(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def save_start(
    run: Path,
    learner: Learner,
    model_config: dict,
    resolved: dict,
    data: TrainingData,
    history: History,
) -> None:
    """``best.pt`` of the starting network (epoch 0), for a run that must beat it."""
    record = history.records[-1]
    save_checkpoint(
        run / "best.pt",
        learner.net,
        model_config,
        config=resolved,
        class_names=data.class_names,
        epoch=0,
        metrics=record,
        validation_classes=data.val_classes,
    )


def save_epoch(
    run: Path,
    cfg: TrainConfig,
    learner: Learner,
    model_config: dict,
    resolved: dict,
    data: TrainingData,
    history: History,
    improved: bool,
    rngs: list[dict],
) -> None:
    """``metrics.jsonl``, then ``best.pt`` (when the epoch improved), then ``last.pt``.

    best.pt before last.pt: a crash in between resumes from the previous epoch, whose last.pt
    still holds the best score it knew.
    """
    _write_metrics(run, history.records)
    record = history.records[-1]
    entries = {
        "config": resolved,
        "class_names": data.class_names,
        "epoch": record["epoch"],
        "metrics": record,
        "validation_classes": data.val_classes,
    }
    if improved:
        save_checkpoint(run / "best.pt", learner.net, model_config, **entries)
    save_checkpoint(
        run / "last.pt",
        learner.net,
        model_config,
        **entries,
        train_config=asdict(cfg),
        optimizer=learner.optimizer.state_dict(),
        scheduler=learner.scheduler.state_dict(),
        scaler=learner.scaler.state_dict(),
        loss=learner.objective.state_dict(),
        rng=rngs[0],
        sampler=_sampler_state(data.sampler),
        history=history.records,
        best=history.best,
        bad_epochs=history.bad_epochs,
        **({"rng_ranks": rngs} if len(rngs) > 1 else {}),
    )


def restore(
    saved: dict, learner: Learner, sampler: MPerClassSampler, procs: Processes
) -> tuple[History, int]:
    """Put a ``last.pt`` state back into the learner, the sampler and the random generators;
    returns the history so far and the epoch to continue with."""
    learner.net.load_state_dict(saved["model"])
    learner.objective.load_state_dict(saved["loss"])
    learner.optimizer.load_state_dict(saved["optimizer"])
    learner.scheduler.load_state_dict(saved["scheduler"])
    learner.scaler.load_state_dict(saved["scaler"])
    _restore_sampler(sampler, saved["sampler"])
    _restore_rng(saved, procs)
    history = History(
        [dict(r) for r in saved["history"]], dict(saved["best"]), int(saved["bad_epochs"])
    )
    return history, int(saved["epoch"]) + 1


def _sampler_state(sampler: MPerClassSampler) -> list[int]:
    """The sampler's class order (PML shuffles it in place, drawing from NumPy's global RNG)."""
    return [int(c) for c in sampler.labels]


def _restore_sampler(sampler: MPerClassSampler, order: list[int]) -> None:
    by_int = {int(c): c for c in sampler.labels}
    if sorted(by_int) != sorted(order):
        raise UserError("the checkpoint's sampler does not match the training classes")
    sampler.labels = [by_int[c] for c in order]


def _restore_rng(saved: dict, procs: Processes) -> None:
    """Put back this rank's random state from a checkpoint (rank 0's without a per-rank one)."""
    per_rank = saved.get("rng_ranks")
    if per_rank is not None and len(per_rank) == procs.world_size:
        rng_state.restore(per_rank[procs.rank.rank])
    elif procs.is_main:
        rng_state.restore(saved["rng"])
    else:
        logger.info(
            "rank %d: the checkpoint holds no random state for %d processes; this rank "
            "draws its augmentations afresh",
            procs.rank.rank,
            procs.world_size,
        )


def _resume_state(run: Path, cfg: TrainConfig) -> dict:
    """The training state of ``run/last.pt``, checked against ``cfg``."""
    state = load_checkpoint(run / "last.pt")
    if "optimizer" not in state or "train_config" not in state:
        raise UserError(f"{run / 'last.pt'} holds no training state to resume from")
    saved = dict(state["train_config"])
    saved["val_fraction"] = TrainConfig.from_dict(saved).image_val_fraction()
    current = asdict(cfg) | {"val_fraction": cfg.image_val_fraction()}
    changed = sorted(
        k for k in current if k not in RESUME_OVERRIDABLE + ("out",) and saved.get(k) != current[k]
    )
    if changed:
        raise UserError(
            f"cannot resume {run} with a different {', '.join(changed)} "
            f"(only {', '.join(RESUME_OVERRIDABLE)} may change)"
        )
    return state


def load_run_config(run: str | Path) -> TrainConfig:
    """The configuration a run was started with (from its ``last.pt``), for ``--resume``."""
    run = Path(run)
    if not (run / "last.pt").is_file():
        raise UserError(f"{run} has no last.pt checkpoint to resume from")
    state = load_checkpoint(run / "last.pt")
    if "train_config" not in state:
        raise UserError(f"{run / 'last.pt'} holds no training state to resume from")
    return TrainConfig.from_dict(dict(state["train_config"]) | {"out": str(run)})
