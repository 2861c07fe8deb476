"""Training an embedding network with a metric-learning loss on m-per-class batches.

The run folder holds ``config.yaml`` (the resolved configuration), ``metrics.jsonl`` (one line
per epoch), ``curves.png`` (loss and validation curves), ``last.pt`` (every epoch: model,
optimizer, scheduler, loss parameters, AMP scaler, RNG and sampler state, epoch, best score) and
``best.pt`` (best validation MAP@R) — all written atomically, so a crash never leaves a torn
file, and ``train(cfg, resume=True)`` continues from ``last.pt`` exactly where it stopped.

Model selection uses a validation split held out of the *seen* classes' training images; the
classes used for the final evaluation are never looked at during training.

The loss and its miner come from :mod:`retrieval.training.objectives`; the backbone from
:mod:`retrieval.model.networks`, its pretrained weights from
:mod:`retrieval.model.pretrained`; the learning rate follows :mod:`retrieval.training.schedule`.

Under ``torchrun --nproc_per_node N -m retrieval train ...`` the N processes train one model
together (:mod:`retrieval.training.distributed`): ``batch_size`` stays the global batch,
miners and losses see all of it, and only rank 0 writes the run folder.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from pytorch_metric_learning.samplers import MPerClassSampler
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from data.datasets import ImageDataset, open_source, parse_classes
from data.transforms import eval_transform, train_transform
from retrieval.atomic import write_text
from retrieval.errors import UserError
from retrieval.evaluation.evaluate import evaluate_embeddings
from retrieval.evaluation.plots import training_curves
from retrieval.model.checkpoint import load_checkpoint, save_checkpoint
from retrieval.model.embed import pick_device
from retrieval.model.networks import build_model
from retrieval.model.pretrained import input_norm, load_pretrained
from retrieval.training import rng as rng_state
from retrieval.training.config import RESUME_OVERRIDABLE, TrainConfig
from retrieval.training.distributed import (
    HeadEmbedding,
    Rank,
    ShardedBatchSampler,
    backend_for,
    broadcast,
    broadcast_module,
    embed_sharded,
    gather_batch,
    gather_objects,
    process_group,
    rank_device,
    rank_from_env,
    shared_randomness,
    sync_loss_gradients,
)
from retrieval.training.objectives import build_objective, pair_cosine
from retrieval.training.schedule import lr_factor

logger = logging.getLogger(__name__)

#: Mean pairwise cosine of the validation embeddings above which they count as collapsed.
COLLAPSE_COSINE = 0.999
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
    dataset = dataset.filter_classes(parse_classes(cfg.training_classes()))
    n_classes = len(np.unique(dataset.labels))
    if n_classes < 2:
        raise UserError(f"training needs at least two classes, the data has {n_classes}")
    return dataset


def _sampler_state(sampler: MPerClassSampler) -> list[int]:
    """The sampler's class order (PML shuffles it in place, drawing from NumPy's global RNG)."""
    return [int(c) for c in sampler.labels]


def _restore_sampler(sampler: MPerClassSampler, order: list[int]) -> None:
    by_int = {int(c): c for c in sampler.labels}
    if sorted(by_int) != sorted(order):
        raise UserError("the checkpoint's sampler does not match the training classes")
    sampler.labels = [by_int[c] for c in order]


def _resume_state(run: Path, cfg: TrainConfig) -> dict:
    """The training state of ``run/last.pt``, checked against ``cfg``."""
    state = load_checkpoint(run / "last.pt")
    if "optimizer" not in state or "train_config" not in state:
        raise UserError(f"{run / 'last.pt'} holds no training state to resume from")
    saved = dict(state["train_config"])
    current = asdict(cfg)
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
    device = rank_device(pick_device(cfg.device), rank)
    with process_group(rank, backend_for(device)):
        return _train(cfg, rank, device, on_step, on_epoch, resume)


def _train(
    cfg: TrainConfig,
    rank: Rank,
    device: torch.device,
    on_step: ProgressFn | None,
    on_epoch: EpochFn | None,
    resume: bool,
) -> dict:
    run = Path(cfg.out)
    saved = _resume_state(run, cfg) if resume else None
    seed_everything(cfg.seed + rank.rank)  # the ranks augment differently; DDP syncs the model
    world, main = rank.world_size, rank.is_main
    if main:
        run.mkdir(parents=True, exist_ok=True)

    full = load_training_data(cfg)
    train_set, val_set = split_train_val(full, cfg.val_fraction, cfg.seed)
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

    weights = None
    if cfg.pretrained is not None and saved is None:
        weights = load_pretrained(cfg.arch, cfg.pretrained)
    try:
        model = build_model(
            cfg.arch,
            cfg.embedding_dim,
            cfg.embedding,
            stem=cfg.stem,
            image_size=cfg.image_size,
            weights=weights,
        ).to(device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # statistics of the global batch
    model_config = {
        "arch": cfg.arch,
        "head_dim": cfg.embedding_dim,
        "embedding": cfg.embedding,
        "embedding_dim": model.output_dim,
        "image_size": cfg.image_size,
        "mean": mean,
        "std": std,
        "stem": cfg.stem,
    }
    objective = build_objective(
        cfg.loss,
        cfg.miner,
        margin=cfg.margin,
        loss_args=cfg.loss_args,
        miner_args=cfg.miner_args,
        num_classes=int(labels.max()) + 1,
        embedding_size=cfg.embedding_dim,
    ).to(device)
    broadcast_module(objective)  # rank 0's initial proxies / class weights everywhere
    params = list(model.parameters()) + list(objective.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    steps = len(train_set) // cfg.batch_size
    if steps == 0:
        raise UserError(
            f"{len(train_set)} training images are fewer than one batch of {cfg.batch_size}"
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(cfg.schedule, round(cfg.warmup_epochs * steps), cfg.epochs * steps)
    )
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    sampler = MPerClassSampler(
        labels, m, batch_size=cfg.batch_size, length_before_new_iter=steps * cfg.batch_size
    )
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size // world,
        sampler=ShardedBatchSampler(sampler, cfg.batch_size, rank),
        drop_last=True,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )

    resolved = asdict(cfg) | {
        "mean": mean,
        "std": std,
        "device": str(device),
        "miner": objective.miner_name,
        "processes": world,
    }
    if main:
        write_text(run / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    class_names = full.class_names
    log_path = run / "metrics.jsonl"
    records: list[dict] = []
    best: dict = {}
    bad_epochs, first_epoch, stopped_early = 0, 1, False
    if saved is not None:
        model.load_state_dict(saved["model"])
        objective.load_state_dict(saved["loss"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        _restore_sampler(sampler, saved["sampler"])
        _restore_rng(saved, rank)
        records = [dict(r) for r in saved["history"]]
        best, bad_epochs = dict(saved["best"]), int(saved["bad_epochs"])
        first_epoch = int(saved["epoch"]) + 1
        if main:
            logger.info("resuming %s at epoch %d", run, first_epoch)
    if main:
        write_text(log_path, "".join(json.dumps(r) + "\n" for r in records))
    trainee: nn.Module = HeadEmbedding(model)  # forward = what the loss sees
    if world > 1:
        trainee = DistributedDataParallel(
            trainee, device_ids=[device.index] if device.type == "cuda" else None
        )

    for epoch in range(first_epoch, cfg.epochs + 1):
        trainee.train()
        objective.train()
        t0, seen, total, lr = time.perf_counter(), 0, 0.0, optimizer.param_groups[0]["lr"]
        for step, (images, targets) in enumerate(loader, start=1):
            images, targets = images.to(device, non_blocking=True), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            value = backward_step(
                trainee,
                objective,
                images,
                targets,
                scaler=scaler,
                use_amp=use_amp,
                seed=_step_seed(cfg.seed, epoch, step),
            )
            if not math.isfinite(value):
                raise UserError(
                    f"the loss became {value} at epoch {epoch}, step {step}; lower the "
                    f"learning rate (now {cfg.lr}). The last good checkpoint is kept in {run}."
                )
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            seen += len(images) * world
            total += value
            if on_step is not None and main:
                on_step(
                    StepInfo(
                        epoch, step, steps, value, seen / max(time.perf_counter() - t0, 1e-9), lr
                    )
                )
        record: dict[str, Any] = {
            "epoch": epoch,
            "loss": total / steps,
            "lr": lr,  # of the epoch's last step
            "images_per_s": seen / (time.perf_counter() - t0),
        }
        val_emb = embed_sharded(model, val_set, device, rank) if val_set is not None else None
        if val_emb is not None:  # on rank 0
            scores = evaluate_embeddings(val_emb, val_set.labels, ks=(1,))
            record["val_recall@1"] = scores["recall@1"]
            record["val_map@r"] = scores["map@r"]
            record.update(_collapse_check(val_emb, epoch, cfg.seed))
        rngs = gather_objects(rng_state.capture())  # every rank's, for an exact resume
        if main:
            records.append(record)
            write_text(log_path, "".join(json.dumps(r) + "\n" for r in records))
            score = record.get("val_map@r", -record["loss"])
            improved = not best or score > best["score"] or math.isnan(best["score"])
            if improved:
                best, bad_epochs = {"score": score, **record}, 0
            else:
                bad_epochs += 1
            stopped_early = cfg.patience > 0 and bad_epochs >= cfg.patience and epoch < cfg.epochs
            entries = {
                "config": resolved,
                "class_names": class_names,
                "epoch": epoch,
                "metrics": record,
            }
            # best.pt before last.pt: a crash in between resumes from the previous epoch, whose
            # last.pt still holds the best score it knew
            if improved:
                save_checkpoint(run / "best.pt", model, model_config, **entries)
            save_checkpoint(
                run / "last.pt",
                model,
                model_config,
                **entries,
                train_config=asdict(cfg),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(),
                loss=objective.state_dict(),
                rng=rngs[0],
                sampler=_sampler_state(sampler),
                history=records,
                best=best,
                bad_epochs=bad_epochs,
                **({"rng_ranks": rngs} if world > 1 else {}),
            )
            if on_epoch is not None:
                on_epoch(record)
        stopped_early = broadcast(stopped_early)
        if stopped_early:
            if main:
                logger.info(
                    "early stop at epoch %d: no better val MAP@R for %d epochs", epoch, cfg.patience
                )
            break
    if main and records:
        training_curves(records, run / "curves.png")
    epochs_run = records[-1]["epoch"] if records else 0
    summary = {
        "run": str(run),
        "best_checkpoint": str(run / "best.pt"),
        "epochs_run": epochs_run,
        "stopped_early": stopped_early,
        **best,
    }
    return broadcast(summary)  # rank 0 knows the history


def backward_step(
    trainee: nn.Module,
    objective: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    scaler: torch.amp.GradScaler,
    use_amp: bool = False,
    seed: int = 0,
) -> float:
    """Embed this process's images, compute the loss on the global batch, back-propagate.

    Alone, the batch is ``images``; under a process group, the embeddings and labels of every
    rank (:func:`~retrieval.training.distributed.gather_batch`), and the gradients come out as
    those of the single-process loss on the global batch once DDP has averaged them
    (:mod:`retrieval.training.distributed`). Randomised miners draw from ``seed``, shared by
    the ranks.

    Returns:
        The loss on the global batch; when it is not finite nothing is back-propagated.
    """
    device = images.device
    with torch.autocast(device.type, enabled=use_amp):
        emb = trainee(images)  # (batch / world, embedding_dim)
    with shared_randomness(seed, device):
        loss = objective(*gather_batch(emb.float(), targets))
    value = loss.item()
    if math.isfinite(value):
        world = dist.get_world_size() if dist.is_initialized() else 1
        scaler.scale(loss * world).backward()  # x world: DDP averages over the ranks
        sync_loss_gradients(objective)
    return value


def _step_seed(seed: int, epoch: int, step: int) -> int:
    """A seed for the step's shared random draws (the same on every rank)."""
    return int(np.random.SeedSequence([seed, epoch, step]).generate_state(1)[0])


def _restore_rng(saved: dict, rank: Rank) -> None:
    """Put back this rank's random state from a checkpoint (rank 0's without a per-rank one)."""
    per_rank = saved.get("rng_ranks")
    if per_rank is not None and len(per_rank) == rank.world_size:
        rng_state.restore(per_rank[rank.rank])
    elif rank.is_main:
        rng_state.restore(saved["rng"])
    else:
        logger.info(
            "rank %d: the checkpoint holds no random state for %d processes; this rank "
            "draws its augmentations afresh",
            rank.rank,
            rank.world_size,
        )


def _collapse_check(embeddings: np.ndarray, epoch: int, seed: int) -> dict:
    """Mean pairwise cosine of (a sample of) the validation embeddings; warns on a collapse."""
    pick = np.random.default_rng(seed).permutation(len(embeddings))[:COLLAPSE_SAMPLE]
    cos = pair_cosine(torch.from_numpy(embeddings[np.sort(pick)]))
    out: dict[str, Any] = {"val_mean_cosine": cos}
    if cos > COLLAPSE_COSINE:
        out["collapsed"] = True
        logger.warning(
            "epoch %d: the validation embeddings have collapsed (mean pairwise cosine %.4f > "
            "%.2f): they are nearly identical; lower the learning rate or change the loss",
            epoch,
            cos,
            COLLAPSE_COSINE,
        )
    return out
