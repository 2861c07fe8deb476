"""Several processes, one run: what ``torchrun`` training and sharded embedding share.

``torchrun --nproc_per_node N -m retrieval train ...`` starts N processes; torch.distributed does
the communication (backend ``gloo`` on CPU, ``nccl`` on CUDA) and
:class:`~torch.nn.parallel.DistributedDataParallel` all-reduces the gradients. This module holds
the pieces metric learning adds around it:

- :func:`rank_from_env` and :func:`process_group`: this process's place and the process group;
- :class:`ShardedBatchSampler`: rank 0 draws the global P x K batches (PML's
  ``MPerClassSampler``) and broadcasts their order; rank ``r`` of ``N`` loads positions
  ``r, r + N, r + 2N, ...`` of each global batch, so together the ranks load exactly the batch
  one process would train on, and each rank holds ``K / N`` images of every class (a rank's
  BatchNorm statistics then cover all the batch's classes, not a few);
- :func:`gather_batch`: the ranks' embeddings and labels, put back in the global batch's order,
  so miners and losses see the whole global batch (a triplet's negative may live on another
  rank);
- :func:`sync_loss_gradients`: the gradient correction for loss parameters (below);
- :func:`embed_sharded`: validation embeddings, each rank embedding a share, gathered on rank 0;
- :class:`Processes`: all of the above behind one small object that the training loop holds
  (rank, world size, ``is_main``, broadcast, gather...); on one process every method returns at
  once without touching ``torch.distributed``, so a single-process run reads as a plain loop.

``batch_size`` is the *global* batch: a configuration trains the same way on 1 or N processes
(each loads ``batch_size / N`` images per step).

Why not PML's ``DistributedLossWrapper`` / ``DistributedMinerWrapper``: they put the rank's own
embeddings first, so every rank sees the global batch in a different order (and a different one
from a single process); they accept only PML loss classes, while the training objectives also
use torch's and this project's losses; and wrapping both the miner and the loss gathers twice.
Gathering once, back into the sampler's order, gives every rank the very batch a single
process would see.

Gradients. Every rank computes the same global loss :math:`L`, but autograd reaches only the
rank's own slice of embeddings (the others arrive as plain tensors). Back-propagating
:math:`N L` and letting DDP average over the N ranks gives the model exactly
:math:`\\partial L / \\partial \\theta` — PML's wrappers scale by N for the same reason. Loss
parameters (proxies, ArcFace's class weights) see every embedding on every rank, so each rank
holds :math:`N\\,\\partial L/\\partial w`; :func:`sync_loss_gradients` averages them across ranks
and divides by N.

BatchNorm: on CUDA the model's BatchNorm layers become ``SyncBatchNorm`` (statistics of the global
batch). torch has no ``SyncBatchNorm`` on the CPU, so there each process normalises with its own
share's statistics, as plain DDP does; DDP copies rank 0's running statistics to the other ranks
at every step, and rank 0's are saved.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sized
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

from retrieval.errors import UserError
from retrieval.model.embed import embed_dataset

T = TypeVar("T")

#: How long a rank waits for the others at a collective (rank 0 validating, saving...).
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Rank:
    """This process's place among the processes of one run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  #: index among the processes of this machine (its GPU)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, logs and plots."""
        return self.rank == 0


def rank_from_env(env: Mapping[str, str] | None = None) -> Rank:
    """``RANK``, ``WORLD_SIZE`` (and ``LOCAL_RANK``) as set by ``torchrun``; ``Rank(0, 1)`` when
    neither is set.

    Raises:
        UserError: only one of them set, not whole numbers, or ``rank`` outside
            ``[0, world_size)``.

    Example:
        >>> rank_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
        Rank(rank=1, world_size=2, local_rank=1)
    """
    env = os.environ if env is None else env
    raw = env.get("RANK"), env.get("WORLD_SIZE")
    if raw == (None, None):
        return Rank()
    if None in raw:
        raise UserError(
            "set both RANK and WORLD_SIZE (torchrun does), or neither for a single process"
        )
    try:
        rank, world_size = int(raw[0]), int(raw[1])
        local_rank = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise UserError(
            f"RANK={raw[0]!r}, WORLD_SIZE={raw[1]!r} and LOCAL_RANK="
            f"{env.get('LOCAL_RANK')!r} must be whole numbers"
        ) from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(
            f"RANK must lie in [0, WORLD_SIZE); got RANK={rank}, WORLD_SIZE={world_size}"
        )
    return Rank(rank, world_size, local_rank)


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: Rank) -> torch.device:
    """The device of this process: on CUDA with several processes, GPU ``LOCAL_RANK``.

    Raises:
        UserError: several processes on a device that neither gloo nor nccl serves (mps).
    """
    if rank.world_size > 1 and device.type not in ("cpu", "cuda"):
        raise UserError(
            f"training on several processes runs on cpu (gloo) or cuda (nccl), not {device.type}"
        )
    if device.type == "cuda" and rank.world_size > 1 and device.index is None:
        if rank.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"process {rank.rank} needs GPU {rank.local_rank}, this machine has "
                f"{torch.cuda.device_count()}: start at most that many processes per node"
            )
        device = torch.device("cuda", rank.local_rank)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # collectives of objects (nccl) use the current GPU
    return device


@contextlib.contextmanager
def process_group(rank: Rank, backend: str = "gloo") -> Iterator[None]:
    """Join the ``torch.distributed`` process group for the duration (nothing for one process,
    or when a group is already initialised).

    Reads ``MASTER_ADDR``/``MASTER_PORT`` from the environment (``torchrun`` sets them).
    """
    if rank.world_size == 1 or dist.is_initialized():
        yield
        return
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise UserError(f"{name} is not set: start the processes with torchrun, or set it")
    dist.init_process_group(backend, rank=rank.rank, world_size=rank.world_size, timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard_range(total: int, rank: Rank) -> range:
    """The positions of ``total`` items that rank ``rank.rank`` handles: contiguous, sizes
    differing by at most 1.

    Example:
        >>> [list(shard_range(5, Rank(r, 2))) for r in range(2)]
        [[0, 1], [2, 3, 4]]
    """
    return range(total * rank.rank // rank.world_size, total * (rank.rank + 1) // rank.world_size)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (itself without a process group)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a process group)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class ShardedBatchSampler(Sampler[int]):
    """This rank's share of every global batch drawn by ``sampler`` (rank 0 draws, all load).

    Args:
        sampler: yields dataset positions whose consecutive runs of ``batch_size`` are the global
            batches (PML's ``MPerClassSampler``). Only rank 0 iterates it, so its random state
            (NumPy's global generator for PML) lives on rank 0 alone; the order is broadcast.
        batch_size: the global batch; a multiple of ``world_size``.
        rank: this process's place.

    Each rank yields ``batch_size / world_size`` positions per batch: rank ``r`` every
    ``world_size``-th position of the batch from its ``r``-th; a trailing incomplete global batch
    is dropped.

    Example:
        >>> list(ShardedBatchSampler(range(8), 4, Rank(1, 2)))
        [1, 3, 5, 7]
    """

    def __init__(self, sampler: Sized, batch_size: int, rank: Rank):
        if batch_size < 1 or batch_size % rank.world_size:
            raise UserError(
                f"the batch of {batch_size} images must split evenly over {rank.world_size} "
                f"processes; choose a batch_size that is a multiple of {rank.world_size}"
            )
        self.sampler = sampler
        self.batch_size = batch_size
        self.rank = rank
        self.local = batch_size // rank.world_size

    def __iter__(self) -> Iterator[int]:
        draws = self.rank.is_main or not _active()  # rank 0, or a rank simulated alone
        order = broadcast([int(i) for i in self.sampler] if draws else [])  # type: ignore[attr-defined]
        full = len(order) // self.batch_size * self.batch_size
        step = self.rank.world_size
        for start in range(0, full, self.batch_size):
            yield from order[start + self.rank.rank : start + self.batch_size : step]

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size * self.local


def gather_batch(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The global batch: every rank's ``embeddings`` and ``labels``, interleaved back into the
    order of :class:`ShardedBatchSampler`'s global batch (row ``j`` of rank ``r`` is row
    ``j * world_size + r``).

    The rank's own rows keep their autograd graph; the others arrive without one. Every rank
    must pass the same number of rows. Without a process group both are returned unchanged.

    Shape:
        ``embeddings`` ``(b, dim)``, ``labels`` ``(b,)`` -> ``(world_size * b, dim)``,
        ``(world_size * b,)``.
    """
    if not _active():
        return embeddings, labels
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(embeddings) for _ in range(world)]
    dist.all_gather(parts, embeddings.detach().contiguous())
    parts[rank] = embeddings
    tags = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(tags, labels.contiguous())
    return torch.stack(parts, dim=1).flatten(0, 1), torch.stack(tags, dim=1).flatten(0, 1)


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank."""
    if not _active():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


def sync_loss_gradients(module: nn.Module) -> None:
    """Turn each rank's :math:`N\\,\\partial L/\\partial w` into :math:`\\partial L/\\partial w`
    for the parameters of a loss computed on the gathered batch (module docstring).

    Averages across ranks (identical in exact arithmetic; averaging keeps the ranks' copies
    equal despite rounding) and divides by the world size.
    """
    if not _active():
        return
    world = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)  # sum of N copies of N dL/dw
            p.grad.div_(world * world)


class HeadEmbedding(nn.Module):
    """``net.head_embedding`` as a module's ``forward``: what DDP wraps for training."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.head_embedding(x)


@contextlib.contextmanager
def shared_randomness(seed: int, device: torch.device) -> Iterator[None]:
    """Inside: torch's generators seeded with ``seed``; outside, their state as before.

    Randomised miners (distance-weighted sampling) run inside it, so that every rank draws the
    same tuples from the same global batch — the tuples one process would draw — while data
    augmentation outside keeps drawing from each rank's own stream.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if device.type == "cpu":  # the CPU generator alone: torch.manual_seed would also queue
            torch.random.default_generator.manual_seed(seed)  # a CUDA seeding (a stack trace)
        else:
            torch.manual_seed(seed)
        yield


def embed_sharded(
    model: nn.Module, dataset: Any, device: torch.device, rank: Rank
) -> np.ndarray | None:
    """Embeddings of all of ``dataset`` on rank 0 (None on the others); each rank embeds its
    :func:`shard_range` share. Every rank must call it. Alone: the whole dataset.

    The model's parameters and buffers are first made rank 0's on every rank: on the CPU each
    rank's BatchNorm running statistics drift apart during an epoch, and the embeddings must be
    those of the model rank 0 saves.
    """
    if not _active():
        return embed_dataset(model, dataset, device=device)
    broadcast_module(model)
    span = shard_range(len(dataset), rank)
    part = embed_dataset(model, dataset.subset(np.arange(span.start, span.stop)), device=device)
    parts: list[Any] | None = [None] * rank.world_size if rank.is_main else None
    dist.gather_object(part, parts, dst=0)
    if parts is None:
        return None
    return np.concatenate([p for p in parts if len(p)])  # an empty share has no width


@dataclass(frozen=True)
class Processes:
    """The processes of one run as the training loop sees them: where this one stands, and the
    collectives it takes part in. On one process every method is the identity (no
    ``torch.distributed`` call); under a process group it calls the functions above.

    Args:
        rank: this process's place.
        device: this process's device.

    Example:
        >>> alone = Processes()
        >>> alone.is_main, alone.broadcast("x"), alone.gather_objects(1)
        (True, 'x', [1])
    """

    rank: Rank = Rank()
    device: torch.device = torch.device("cpu")

    @classmethod
    def current(cls, device: torch.device) -> Processes:
        """The processes of the current process group (this one alone without a group)."""
        if not _active():
            return cls(Rank(), device)
        return cls(Rank(dist.get_rank(), dist.get_world_size()), device)

    @property
    def world_size(self) -> int:
        return self.rank.world_size

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and reports progress."""
        return self.rank.is_main

    @property
    def several(self) -> bool:
        """More than one process: the collectives below communicate."""
        return self.rank.world_size > 1

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        return broadcast(obj) if self.several else obj

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        return gather_objects(obj) if self.several else [obj]

    def gather_batch(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The global batch (:func:`gather_batch`)."""
        return gather_batch(embeddings, labels) if self.several else (embeddings, labels)

    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers in ``module`` on every rank."""
        if self.several:
            broadcast_module(module)

    def sync_loss_gradients(self, module: nn.Module) -> None:
        """The loss parameters' gradients of the global loss (:func:`sync_loss_gradients`)."""
        if self.several:
            sync_loss_gradients(module)

    def shard_batches(self, sampler: Sized, batch_size: int) -> Sized:
        """What this rank loads of ``sampler``'s global batches (:class:`ShardedBatchSampler`);
        alone, ``sampler`` itself."""
        return ShardedBatchSampler(sampler, batch_size, self.rank) if self.several else sampler

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` under DistributedDataParallel (gradients averaged over the ranks)."""
        if not self.several:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def embed(self, model: nn.Module, dataset: Any) -> np.ndarray | None:
        """Embeddings of ``dataset`` on rank 0, None on the others (:func:`embed_sharded`)."""
        if not self.several:
            return embed_dataset(model, dataset, device=self.device)
        return embed_sharded(model, dataset, self.device, self.rank)


@contextlib.contextmanager
def join(rank: Rank, device: torch.device) -> Iterator[Processes]:
    """This process's :class:`Processes` on ``device`` (its own GPU under ``torchrun``), inside
    the process group for the duration (:func:`process_group`)."""
    device = rank_device(device, rank)
    with process_group(rank, backend_for(device)):
        yield Processes(rank, device)
