"""Training on several processes: the global batch, its gradients, and torchrun runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from pytorch_metric_learning.samplers import MPerClassSampler
from torch.nn.parallel import DistributedDataParallel

from retrieval.errors import UserError
from retrieval.evaluation.evaluate import evaluate_embeddings
from retrieval.model.checkpoint import load_checkpoint, load_model, preprocessing
from retrieval.model.embed import embed_dataset
from retrieval.model.networks import build_model
from retrieval.training.distributed import (
    HeadEmbedding,
    Rank,
    ShardedBatchSampler,
    rank_device,
    rank_from_env,
)
from retrieval.training.loop import (
    TrainConfig,
    backward_step,
    load_training_data,
    split_train_val,
)
from retrieval.training.objectives import build_objective
from tests.conftest import run_torchrun

WORLD = 2
#: (loss, miner), one of each input kind of retrieval.training.objectives: tuples (with a
#: deterministic and a randomised miner), pairs, classes (with loss parameters), triplets,
#: mnrl (batch order).
CASES = [
    ("triplet", "semi-hard"),
    ("triplet", "distance-weighted"),
    ("contrastive", "multi-similarity"),
    ("arcface", None),
    ("triplet-margin", "batch-hard"),
    ("multiple-negatives-ranking", None),
]
CLASSES, PER_CLASS, DIM, SIZE = 4, 4, 8, 16


def test_rank_comes_from_torchrun_variables():
    assert rank_from_env({}) == Rank(0, 1)
    assert rank_from_env({"RANK": "1", "WORLD_SIZE": "3"}) == Rank(1, 3, 1)
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}  # second machine, second GPU
    assert rank_from_env(env) == Rank(3, 4, 1)
    for env in (
        {"RANK": "0"},
        {"RANK": "2", "WORLD_SIZE": "2"},
        {"RANK": "a", "WORLD_SIZE": "2"},
        {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "x"},
    ):
        with pytest.raises(UserError):
            rank_from_env(env)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_sampler_splits_every_global_batch(world):
    labels = np.repeat(np.arange(6), 10)
    batch = 24
    np.random.seed(0)  # PML draws from NumPy's global generator
    sampler = MPerClassSampler(labels, 4, batch_size=batch, length_before_new_iter=48)
    expected = [int(i) for i in sampler]
    slices = []
    for r in range(world):
        np.random.seed(0)
        inner = MPerClassSampler(labels, 4, batch_size=batch, length_before_new_iter=48)
        part = ShardedBatchSampler(inner, batch, Rank(r, world))
        slices.append(list(part))
        assert len(slices[-1]) == len(part) == 48 // world
    local = batch // world
    for b in range(2):  # batch b is the ranks' b-th shares, interleaved
        shares = [s[b * local : (b + 1) * local] for s in slices]
        joined = [share[j] for j in range(local) for share in shares]
        assert joined == expected[b * batch : (b + 1) * batch]
        for share in shares:  # every rank holds 4 / world images of each of the 6 classes
            assert np.bincount(labels[share], minlength=6).tolist() == [4 // world] * 6


def test_each_process_takes_its_own_gpu(monkeypatch):
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cuda = torch.device("cuda")
    assert rank_device(cuda, Rank()) == cuda and chosen == []  # one process: as given
    assert rank_device(cuda, Rank(3, 4, 1)) == torch.device("cuda", 1)
    assert chosen == [torch.device("cuda", 1)]
    with pytest.raises(UserError, match="has 2"):
        rank_device(cuda, Rank(2, 4, 2))
    cpu = torch.device("cpu")
    assert rank_device(cpu, Rank(1, 2, 1)) == cpu
    with pytest.raises(UserError, match="not mps"):
        rank_device(torch.device("mps"), Rank(0, 2))


def test_sharded_sampler_refuses_uneven_batches():
    with pytest.raises(UserError, match="multiple of 3"):
        ShardedBatchSampler(range(8), 8, Rank(0, 3))


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(CLASSES * PER_CLASS, 3, SIZE, SIZE, generator=g)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)  # P x K, as the sampler yields
    return images, labels


def _step(loss: str, miner: str | None, rank: int, world: int) -> dict:
    """One backward step of rank ``rank`` of ``world`` on its slice of the global batch."""
    torch.manual_seed(0)
    model = build_model("small", DIM, image_size=SIZE).eval()  # BN on fixed statistics
    objective = build_objective(loss, miner, num_classes=CLASSES, embedding_size=DIM)
    trainee = HeadEmbedding(model)
    if world > 1:
        trainee = DistributedDataParallel(trainee)
    images, labels = _global_batch()
    part = slice(rank, None, world)  # what ShardedBatchSampler gives rank `rank`
    value = backward_step(
        trainee,
        objective,
        images[part],
        labels[part],
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        seed=7,
    )
    return {
        "loss": value,
        "model": {k: p.grad.clone() for k, p in model.named_parameters()},
        "objective": {k: p.grad.clone() for k, p in objective.named_parameters()},
    }


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {f"{loss}/{miner}": _step(loss, miner, rank, world) for loss, miner in CASES}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_steps(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize(("loss", "miner"), CASES)
def test_two_processes_give_the_loss_and_gradients_of_one(two_process_steps, loss, miner):
    one = _step(loss, miner, 0, 1)  # a single process on the whole batch
    for got in two_process_steps:
        got = got[f"{loss}/{miner}"]
        assert got["loss"] == pytest.approx(one["loss"], rel=1e-5)
        for group in ("model", "objective"):
            assert got[group].keys() == one[group].keys()
            for name, grad in one[group].items():
                torch.testing.assert_close(
                    got[group][name], grad, rtol=1e-4, atol=1e-6, msg=f"{group} {name}"
                )
    assert any(g.abs().sum() > 0 for g in one["model"].values())
    if loss == "arcface":
        assert one["objective"], "ArcFace's class weights are loss parameters"


def _train_worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    """Train through ``retrieval.training.loop.train`` as rank ``rank``, recording the files it
    writes."""
    import retrieval.training.loop as train_module

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    written: list[str] = []
    for name in ("write_text", "save_checkpoint", "training_curves"):

        def record(*args, _real=getattr(train_module, name), **kwargs):
            written.append(Path(args[1] if _real.__name__ == "training_curves" else args[0]).name)
            return _real(*args, **kwargs)

        setattr(train_module, name, record)
    steps: list[int] = []
    cfg = train_module.TrainConfig(
        data=folder,
        classes="",
        epochs=1,
        batch_size=40,
        m_per_class=4,
        image_size=16,
        val_fraction=0.2,
        device="cpu",
        out=str(Path(out) / "run"),
    )
    summary = train_module.train(cfg, on_step=lambda s: steps.append(s.step))
    torch.save(
        {"written": written, "summary": summary, "steps": steps}, Path(out) / f"rank{rank}.pt"
    )


@pytest.mark.slow
def test_only_rank_zero_writes_and_reports(digits_folder, tmp_path):
    mp.spawn(
        _train_worker,
        args=(WORLD, _free_port(), str(digits_folder), str(tmp_path)),
        nprocs=WORLD,
        join=True,
    )
    main, other = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert {"config.yaml", "metrics.jsonl", "best.pt", "last.pt", "curves.png"} <= set(
        main["written"]
    )
    assert main["steps"] == list(range(1, 7))  # 240 training images / 40 per global batch
    assert other["written"] == [] and other["steps"] == []
    assert other["summary"] == main["summary"]  # every rank returns rank 0's summary
    assert main["summary"]["epoch"] == 1 and 0 <= main["summary"]["val_map@r"] <= 1
    # The validation split was embedded half by each rank: the metrics are those of the saved
    # model on the whole split, computed here by one process.
    net, state = load_model(tmp_path / "run" / "best.pt")
    cfg = TrainConfig(data=str(digits_folder), classes="", image_size=16, val_fraction=0.2)
    _, val = split_train_val(load_training_data(cfg), 0.2, cfg.seed)
    emb = embed_dataset(net, val.with_transform(preprocessing(state)))
    scores = evaluate_embeddings(emb, val.labels, ks=(1,))
    assert main["summary"]["val_map@r"] == pytest.approx(scores["map@r"], abs=1e-6)
    assert main["summary"]["val_recall@1"] == pytest.approx(scores["recall@1"], abs=1e-6)


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_torchrun(["train", *args], cwd, nproc=WORLD)


def _train_args(digits_folder: Path, out: Path, epochs: int) -> list[str]:
    return [
        "--data",
        str(digits_folder),
        "--classes",
        "",
        "--epochs",
        str(epochs),
        "--batch-size",
        "40",
        "--m-per-class",
        "4",
        "--image-size",
        "16",
        "--val-fraction",
        "0.2",
        "--loss",
        "arcface",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]


@pytest.mark.slow
def test_torchrun_trains_saves_once_and_resumes(digits_folder, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run = _torchrun(_train_args(digits_folder, whole, 2), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("best checkpoint:") == 1  # rank 0 reports, rank 1 is quiet
    config = yaml.safe_load((whole / "config.yaml").read_text())
    assert config["processes"] == WORLD and config["batch_size"] == 40
    records = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]  # 0: the untrained network
    assert all(np.isfinite(r["loss"]) and 0 <= r["val_map@r"] <= 1 for r in records[1:])
    state = load_checkpoint(whole / "last.pt")
    assert len(state["rng_ranks"]) == WORLD
    # Every rank kept its own augmentation stream.
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])
    assert sorted(p.name for p in whole.iterdir()) == [
        "best.pt",
        "config.yaml",
        "curves.png",
        "last.pt",
        "metrics.jsonl",
    ]

    # One epoch, then --resume for the second: the same model as the run never stopped.
    run = _torchrun(_train_args(digits_folder, cut, 1), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    first = (cut / "metrics.jsonl").read_text()
    run = _torchrun(["--resume", str(cut), "--epochs", "2"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (cut / "metrics.jsonl").read_text().startswith(first)
    resumed = load_checkpoint(cut / "last.pt")
    assert resumed["epoch"] == state["epoch"] == 2
    for key in state["model"]:
        torch.testing.assert_close(resumed["model"][key], state["model"][key], rtol=0, atol=0)
    for key in state["loss"]:  # ArcFace's class weights too
        torch.testing.assert_close(resumed["loss"][key], state["loss"][key], rtol=0, atol=0)


@pytest.mark.slow
def test_torchrun_refuses_a_batch_that_does_not_split(digits_folder, tmp_path):
    args = _train_args(digits_folder, tmp_path / "odd", 1)
    args[args.index("--batch-size") + 1] = "39"  # 13 classes x 3 images: odd
    args[args.index("--m-per-class") + 1] = "3"
    run = _torchrun(args, tmp_path)
    assert run.returncode != 0
    assert "must split evenly over the 2 processes" in run.stderr
    assert not (tmp_path / "odd" / "last.pt").exists()


def test_one_process_needs_no_process_group(monkeypatch):
    """Alone, every collective of ``Processes`` returns its input without torch.distributed."""
    from retrieval.training.distributed import Processes

    def refuse(*args, **kwargs):
        raise AssertionError("torch.distributed was called on one process")

    for name in ("broadcast_object_list", "all_gather_object", "all_gather", "broadcast"):
        monkeypatch.setattr(dist, name, refuse)
    alone = Processes()
    assert alone.is_main and alone.world_size == 1 and not alone.several
    emb, labels = torch.randn(4, 3), torch.arange(4)
    got = alone.gather_batch(emb, labels)
    assert got[0] is emb and got[1] is labels
    assert alone.broadcast({"a": 1}) == {"a": 1} and alone.gather_objects(5) == [5]
    sampler = range(8)
    assert alone.shard_batches(sampler, 4) is sampler
    net = torch.nn.Linear(3, 2)
    assert alone.wrap(net) is net
    alone.broadcast_module(net)
    alone.sync_loss_gradients(net)
    assert Processes.current(torch.device("cpu")) == alone
