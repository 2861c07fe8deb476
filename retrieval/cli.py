"""The ``retrieval`` command line: train, embed, index, search, evaluate, demo.

User errors (missing files, corrupt images, mismatched index and model, bad options) print one
line ``error: ...`` on stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import typer
import yaml
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from data.datasets import BUILTIN, ImageDataset, open_source, parse_classes, read_ref
from data.images import read_image
from retrieval.atomic import write_json, write_npy
from retrieval.errors import USER_ERRORS, UserError
from retrieval.evaluation.evaluate import pixel_vectors
from retrieval.evaluation.metrics import DEFAULT_KS
from retrieval.evaluation.plots import Tile, neighbour_grid
from retrieval.index.gallery import JOURNAL_FILE, METRICS, GalleryIndex, read_manifest
from retrieval.model.checkpoint import file_sha256, load_model, preprocessing
from retrieval.model.embed import embed_dataset, pick_device
from retrieval.training.distributed import rank_from_env
from retrieval.training.loop import (
    RESUME_OVERRIDABLE,
    StepInfo,
    TrainConfig,
    load_run_config,
    train,
)

app = typer.Typer(
    help="Deep metric learning and image retrieval: train, index, search, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
index_app = typer.Typer(help="Build and inspect FAISS indexes.", no_args_is_help=True)
app.add_typer(index_app, name="index")

console = Console()
err_console = Console(stderr=True)
logger = logging.getLogger("retrieval")


# ------------------------------------------------------------------------------------ helpers


def _progress(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
    )


def _embed_with_progress(
    model, dataset: ImageDataset, device, what: str, batch_size: int = 256
) -> np.ndarray:
    with _progress(transient=True) as bar:
        task = bar.add_task(f"embedding {what}", total=len(dataset), info="")
        return embed_dataset(
            model,
            dataset,
            batch_size=batch_size,
            device=device,
            on_batch=lambda n: bar.advance(task, n),
        )


def _open(
    spec: str,
    split: str | None,
    classes: str | None,
    data_root: Path | None,
    image_size: int | None = None,
) -> ImageDataset:
    ds = open_source(spec, split=split, root=data_root, draft_size=image_size)
    return ds.filter_classes(parse_classes(classes))


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        raise UserError(f"--ks takes whole numbers separated by commas, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise UserError(f"--ks takes positive whole numbers, got {text!r}")
    return ks


def _metrics_table(rows: dict[str, dict], ks, title: str) -> Table:
    table = Table(title=title)
    table.add_column("model")
    for k in ks:
        table.add_column(f"R@{k}", justify="right")
    table.add_column("MAP@R", justify="right")
    for name, m in rows.items():
        table.add_row(name, *[f"{m[f'recall@{k}']:.3f}" for k in ks], f"{m['map@r']:.3f}")
    return table


def _read_query(path: str) -> object:
    if path.startswith(BUILTIN + ":"):
        return read_ref(path)
    return read_image(path)


def _expand_queries(images: list[str]) -> list[str]:
    out: list[str] = []
    for item in images:
        p = Path(item)
        if p.is_dir():
            from data.images import is_image_file

            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and is_image_file(f))
            if not found:
                raise UserError(f"{p}: no image files in this folder")
            out += found
        else:
            out.append(item)
    return out


# ------------------------------------------------------------------------------------ train


@app.command("train")
def train_cmd(
    config: Path | None = typer.Option(
        None, "--config", help="YAML file of defaults; command-line options override it."
    ),
    resume: Path | None = typer.Option(
        None,
        "--resume",
        help="Run folder to continue from "
        "its last.pt (only --epochs, --device, --num-workers "
        "and --patience may change).",
    ),
    data: str | None = typer.Option(
        None,
        help=f"Training source: {BUILTIN}[:train], a "
        "folder of class sub-folders, or a CSV manifest.",
    ),
    classes: str | None = typer.Option(
        None, help="Seen classes to train on, e.g. 0-4 ('' = all). Default 0-4."
    ),
    data_root: str | None = typer.Option(None, help="Folder of the built-in dataset."),
    arch: str | None = typer.Option(
        None,
        help="Backbone: small | resnet18 | resnet34 | "
        "resnet50 | mobilenet_v3_small | mobilenet_v3_large | "
        "efficientnet_b0 | convnext_tiny | efficientnet_lite0.",
    ),
    stem: str | None = typer.Option(None, help="small (28-64 px inputs, default) | imagenet."),
    pretrained: str | None = typer.Option(
        None, help="imagenet, or PATH of a torchvision-format state dict."
    ),
    loss: str | None = typer.Option(
        None,
        help="Embedding loss: triplet (default), "
        "contrastive, cosine-embedding, hinge-embedding, arcface, "
        "infonce, multiple-negatives-ranking, supcon, ...",
    ),
    miner: str | None = typer.Option(
        None,
        help="all | batch-hard | semi-hard | easy-hard | "
        "triplet-margin | distance-weighted | pair-margin | "
        "multi-similarity (default: the loss's natural one).",
    ),
    loss_arg: list[str] | None = typer.Option(
        None, "--loss-arg", help="Loss argument KEY=VALUE (repeatable), e.g. margin=0.5."
    ),
    miner_arg: list[str] | None = typer.Option(
        None, "--miner-arg", help="Miner argument KEY=VALUE (repeatable)."
    ),
    epochs: int | None = typer.Option(None, help="Training epochs."),
    batch_size: int | None = typer.Option(
        None, help="Images per batch (P x K), over all processes under torchrun."
    ),
    m_per_class: int | None = typer.Option(None, help="K: images per class in a batch."),
    lr: float | None = typer.Option(None, help="Learning rate."),
    schedule: str | None = typer.Option(None, help="constant (default) | cosine."),
    warmup_epochs: float | None = typer.Option(None, help="Linear warm-up, epochs."),
    grad_clip: float | None = typer.Option(None, help="Max gradient norm (0 = off)."),
    patience: int | None = typer.Option(
        None, help="Early stop after this many epochs without a better val MAP@R (0 = off)."
    ),
    amp: bool | None = typer.Option(
        None, "--amp/--no-amp", help="Mixed precision on CUDA (default on; never used on CPU)."
    ),
    margin: float | None = typer.Option(
        None, help="Triplet margin (loss and semi-hard miner), distance units."
    ),
    embedding_dim: int | None = typer.Option(None, help="Length of the embedding head."),
    embedding: str | None = typer.Option(
        None,
        help="What is indexed: head (the embedding "
        "head's output) or features (the backbone features "
        "under it; they transfer better to unseen classes).",
    ),
    image_size: int | None = typer.Option(None, help="Input side, pixels."),
    augment: bool | None = typer.Option(
        None, "--augment/--no-augment", help="Random resized crop and flip (default on)."
    ),
    val_fraction: float | None = typer.Option(
        None, help="Share of the seen classes' images held out for model selection (default 0.1)."
    ),
    weight_decay: float | None = typer.Option(None, help="Adam weight decay."),
    num_workers: int | None = typer.Option(None, help="DataLoader worker processes."),
    seed: int | None = typer.Option(None, help="Random seed."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | mps."),
    out: str | None = typer.Option(None, "--out", help="Run folder (default runs/train)."),
) -> None:
    """Train an embedding network (default: triplet loss, semi-hard miner, P x K batches);
    `torchrun --nproc_per_node N -m retrieval train ...` trains one model on N processes."""
    overrides = {
        "data": data,
        "classes": classes,
        "data_root": data_root,
        "arch": arch,
        "stem": stem,
        "pretrained": pretrained,
        "loss": loss,
        "miner": miner,
        "loss_args": _key_values(loss_arg, "--loss-arg"),
        "miner_args": _key_values(miner_arg, "--miner-arg"),
        "epochs": epochs,
        "batch_size": batch_size,
        "m_per_class": m_per_class,
        "lr": lr,
        "schedule": schedule,
        "warmup_epochs": warmup_epochs,
        "grad_clip": grad_clip,
        "patience": patience,
        "amp": amp,
        "margin": margin,
        "embedding_dim": embedding_dim,
        "embedding": embedding,
        "image_size": image_size,
        "augment": augment,
        "val_fraction": val_fraction,
        "weight_decay": weight_decay,
        "num_workers": num_workers,
        "seed": seed,
        "device": device,
        "out": out,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    if resume is not None:
        fixed = sorted(k for k in given if k not in RESUME_OVERRIDABLE)
        if fixed or config is not None:
            raise UserError(
                f"--resume continues a run as it was configured; only "
                f"{', '.join(RESUME_OVERRIDABLE)} may be given "
                f"(got {', '.join(fixed) or '--config'})"
            )
        cfg = TrainConfig.from_dict(asdict(load_run_config(resume)) | given)
    else:
        values: dict = {}
        if config is not None:
            if not config.is_file():
                raise UserError(f"{config}: no such config file")
            try:
                loaded = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as exc:
                raise UserError(f"{config} is not valid YAML: {exc}") from None
            if not isinstance(loaded, dict):
                raise UserError(f"{config} must hold a mapping of option: value")
            values.update(loaded)
        values.update(given)
        cfg = TrainConfig.from_dict(values)

    if not rank_from_env().is_main:  # torchrun: rank 0 reports for all
        train(cfg, resume=resume is not None)
        return
    with _progress() as bar:
        tasks: list = []  # the bar appears with the first step, after the data has loaded

        def on_step(s: StepInfo) -> None:
            if not tasks:
                tasks.append(bar.add_task("", total=s.steps, info=""))
            bar.update(
                tasks[0],
                total=s.steps,
                completed=s.step,
                description=f"epoch {s.epoch}/{cfg.epochs}",
                info=f"loss {s.loss:.4f}  lr {s.lr:.2e}  {s.images_per_s:,.0f} img/s",
            )

        def on_epoch(rec: dict) -> None:
            val = (
                f"  val R@1 {rec['val_recall@1']:.3f}  MAP@R {rec['val_map@r']:.3f}"
                if "val_map@r" in rec
                else ""
            )
            bar.console.print(f"epoch {rec['epoch']}: loss {rec['loss']:.4f}{val}")

        summary = train(cfg, on_step=on_step, on_epoch=on_epoch, resume=resume is not None)
    stop = " (early stop)" if summary["stopped_early"] else ""
    console.print(
        f"best checkpoint: {summary['best_checkpoint']} (epoch {summary['epoch']} "
        f"of {summary['epochs_run']}{stop}); curves: {Path(cfg.out) / 'curves.png'}"
    )


def _key_values(items: list[str] | None, option: str) -> dict | None:
    """``["margin=0.5", ...]`` -> ``{"margin": 0.5}`` (values read as YAML scalars)."""
    if not items:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{option} takes KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


# ------------------------------------------------------------------------------------ embed


@app.command("embed")
def embed_cmd(
    source: str = typer.Argument(..., help=f"{BUILTIN}[:train|test], a folder or a CSV."),
    model: Path = typer.Option(..., "--model", help="Checkpoint (.pt) from `retrieval train`."),
    out: Path | None = typer.Option(None, "--out", help="Output .npy (ids go to OUT.ids.json)."),
    shards: Path | None = typer.Option(
        None,
        "--shards",
        help="Instead of --out: write this "
        "process's shard of the gallery into this folder "
        "(one per process under torchrun; for `index build "
        "--from-shards`).",
    ),
    split: str | None = typer.Option(None, help="Split (built-in or CSV split column)."),
    classes: str | None = typer.Option(None, help="Keep these classes, e.g. 5-9."),
    data_root: Path | None = typer.Option(None, help="Folder of the built-in dataset."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps."),
) -> None:
    """Embed every image of a source; writes OUT (.npy, float32) and OUT.ids.json, or with
    --shards one shard per process (`torchrun --nproc_per_node N -m retrieval embed ...`)."""
    from retrieval.index.shards import BACKEND, embed_shard, shard_range
    from retrieval.training.distributed import process_group, rank_device

    rank = rank_from_env()
    if (out is None) == (shards is None):
        raise UserError("give either --out FILE.npy or --shards DIR")
    if out is not None and rank.world_size > 1:
        raise UserError(f"{rank.world_size} processes would all write {out}; use --shards DIR")
    net, state = load_model(model)
    ds = _open(source, split, classes, data_root, state["model_config"]["image_size"])
    ds = ds.with_transform(preprocessing(state))
    if shards is not None:
        dev = pick_device(device)
        dev = rank_device(dev, rank) if dev.type == "cuda" else dev  # one GPU per process
        with process_group(rank, BACKEND), _progress(transient=True) as bar:
            task = bar.add_task(
                f"embedding {source} (rank {rank.rank})",
                total=len(shard_range(len(ds), rank)),
                info="",
            )
            path = embed_shard(
                net,
                ds,
                shards,
                rank,
                file_sha256(model),
                str(Path(model).resolve()),
                source,
                device=dev,
                on_batch=lambda n: bar.advance(task, n),
            )
        console.print(
            f"rank {rank.rank} of {rank.world_size}: wrote {path} and {path.with_suffix('.npy')}"
        )
        return
    emb = _embed_with_progress(net, ds, pick_device(device), source)
    out = out if out.suffix == ".npy" else out.with_suffix(".npy")
    write_npy(out, emb)
    ids_path = out.with_suffix(".ids.json")
    write_json(
        ids_path,
        {
            "class_names": ds.class_names,
            "items": [{"ref": r, "label": int(y)} for r, y in zip(ds.refs, ds.labels, strict=True)],
        },
    )
    console.print(f"wrote {out} {tuple(emb.shape)} and {ids_path}")


# ------------------------------------------------------------------------------------ index

_INDEX_HELP = (
    "FAISS factory string: Flat (exact), HNSW32, IVF1024,Flat, IVF1024,PQ16, "
    "OPQ16,IVF1024,PQ16, SQ8, ... or auto (chosen from the gallery size and "
    "--memory-budget)."
)


@index_app.command("build")
def index_build(
    source: str | None = typer.Argument(
        None, help=f"Gallery: {BUILTIN}[:split], a folder or a CSV (or give --from-shards)."
    ),
    model: Path = typer.Option(..., "--model", help="Checkpoint (.pt) from `retrieval train`."),
    out: Path = typer.Option(..., "--out", help="Index folder to write."),
    from_shards: Path | None = typer.Option(
        None,
        "--from-shards",
        help="Instead of SOURCE: "
        "the folder of `retrieval embed --shards` "
        "(merged part by part; IVF lists are merged).",
    ),
    metric: str = typer.Option("cosine", help=f"{' | '.join(METRICS)}."),
    index_type: str = typer.Option("Flat", "--index", help=_INDEX_HELP),
    memory_budget: str = typer.Option(
        "2GB",
        "--memory-budget",
        help="Memory the index may use, for --index auto (e.g. 512MB, 4GB).",
    ),
    nprobe: int | None = typer.Option(
        None,
        "--nprobe",
        min=1,
        help="IVF lists visited per query by default (stored in the index).",
    ),
    ef_search: int | None = typer.Option(
        None, "--ef-search", min=1, help="HNSW search depth by default (stored in the index)."
    ),
    on_disk: bool = typer.Option(
        False,
        "--on-disk",
        help="IVF types: keep the inverted lists "
        "in OUT/index.ivfdata, memory-mapped, never all in memory "
        "(built one shard at a time; the index is then read-only).",
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace OUT when it is an index folder already (anything else there is refused).",
    ),
    split: str | None = typer.Option(None, help="Split (built-in or CSV split column)."),
    classes: str | None = typer.Option(None, help="Keep these classes, e.g. 5-9."),
    data_root: Path | None = typer.Option(None, help="Folder of the built-in dataset."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps."),
) -> None:
    """Embed a gallery and save a FAISS index folder (index, metadata, manifest)."""
    import shutil
    import tempfile

    from retrieval.atomic import check_replaceable, real_path
    from retrieval.index.gallery import is_index_folder, parse_memory
    from retrieval.serving.service import index_lock

    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    # before any work: never replace what is not an index, nor an index unasked
    if is_index_folder(out) and not overwrite:
        raise UserError(
            f"{out} holds an index already; pass --overwrite to replace it, or choose another --out"
        )
    check_replaceable(real_path(out), is_index_folder, "an index folder")
    budget = parse_memory(memory_budget)
    if (source is None) == (from_shards is None):
        raise UserError("give either a gallery SOURCE or --from-shards DIR")
    net, state = load_model(model)
    built_with = dict(
        metric=metric,
        model_sha256=file_sha256(model),
        model_path=str(Path(model).resolve()),
        preprocessing={k: state["model_config"][k] for k in ("image_size", "mean", "std")},
        index_type=index_type,
        memory_budget=budget,
    )
    # on-disk lists are merged here, then renamed into OUT: the same file system
    work = None
    if on_disk:
        real_out = real_path(out)
        real_out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{real_out.name}.lists-", dir=real_out.parent))
    try:
        if from_shards is not None:
            from retrieval.index.shards import build_index_from_shards

            if split is not None or classes is not None:
                raise UserError(
                    "--split and --classes apply when embedding; the shards are already embedded"
                )
            index = build_index_from_shards(from_shards, **built_with, on_disk=work)
        else:
            ds = _open(source, split, classes, data_root, state["model_config"]["image_size"])
            emb = _embed_with_progress(
                net, ds.with_transform(preprocessing(state)), pick_device(device), source
            )
            index = GalleryIndex.build(
                emb, ds.refs, ds.labels, ds.class_names, **built_with, on_disk=work
            )
        index.set_search_defaults(nprobe=nprobe, ef_search=ef_search)
        with index_lock(out):
            if is_index_folder(out) and not overwrite:  # built by another process meanwhile
                raise UserError(f"{out} holds an index already; pass --overwrite to replace it")
            index.save(out)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    where = " (inverted lists on disk)" if on_disk else ""
    console.print(
        f"indexed {len(index)} images ({index.manifest.dim}-d, {metric}, "
        f"{index.manifest.index_type}) in {out}{where}"
    )


@index_app.command("add")
def index_add(
    index_dir: Path = typer.Argument(..., help="Index folder from `retrieval index build`."),
    sources: list[str] = typer.Argument(
        ...,
        help="Image files (labelled --label), folders of "
        "class sub-folders or CSV manifests (labelled by them).",
    ),
    label: str | None = typer.Option(
        None,
        "--label",
        help="Class of the added images "
        "(default: their folder's class; 'unlabelled' for "
        "single files).",
    ),
    model: Path | None = typer.Option(
        None,
        "--model",
        help="Checkpoint; default: the one the index was built with (must be the same).",
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps."),
) -> None:
    """Add images to an index; they get new ids (ids are never reused)."""
    from retrieval.serving.service import UNLABELLED, SearchService, index_lock

    with index_lock(index_dir):
        service = SearchService(index_dir, model, device=device)
        vectors, refs, labels = [], [], []
        for src in sources:
            path = Path(src)
            if path.is_dir() or path.suffix.lower() == ".csv" or src.startswith(BUILTIN):
                ds = open_source(src, draft_size=service.image_size)
                vectors.append(
                    _embed_with_progress(
                        service.model, ds.with_transform(service.transform), service.device, src
                    )
                )
                refs += ds.refs
                labels += [label or ds.class_names[y] for y in ds.labels]
            else:
                vectors.append(service.embed([read_image(path)]))
                refs.append(str(path.resolve()))
                labels.append(label or UNLABELLED)
        ids = service.add_vectors(np.concatenate(vectors), refs, labels)
    span = f"id {ids[0]}" if len(ids) == 1 else f"ids {ids[0]}-{ids[-1]}"
    console.print(f"added {len(ids)} images ({span}) to {index_dir}; it holds {len(service)}")


@index_app.command("remove")
def index_remove(
    index_dir: Path = typer.Argument(..., help="Index folder."),
    ids: list[int] = typer.Argument(
        ..., help="Ids of the items to remove (see `retrieval search --json`)."
    ),
) -> None:
    """Remove items from an index by id (all or nothing)."""
    from retrieval.serving.service import index_lock

    with index_lock(index_dir):
        index = GalleryIndex.load(index_dir)
        n = index.remove(ids)
        index.commit(index_dir)
    console.print(f"removed {n} items from {index_dir}; it holds {len(index)}")


@index_app.command("compact")
def index_compact(index_dir: Path = typer.Argument(..., help="Index folder.")) -> None:
    """Fold the journal of recent additions and removals into a new snapshot of the index."""
    from retrieval.serving.service import index_lock

    with index_lock(index_dir):
        index = GalleryIndex.load(index_dir)
        index.save(index_dir)
    console.print(f"{index_dir}: {len(index)} items, journal folded into the snapshot")


@index_app.command("info")
def index_info(index_dir: Path = typer.Argument(..., help="Index folder.")) -> None:
    """Show what an index holds and what it was built with."""
    m = read_manifest(index_dir)
    journal = Path(index_dir) / JOURNAL_FILE
    pending = journal.is_file() and journal.stat().st_size > 0  # replayed: no memory map then
    table = Table(show_header=False)
    for key, value in asdict(m).items():
        if key == "checksums":
            value = ", ".join(f"{k}: {v[:12]}" for k, v in value.items())
        if key == "count" and pending:
            value = f"{value} at the last snapshot; changes since in {JOURNAL_FILE}"
        table.add_row(key, str(value))
    described = GalleryIndex.load(index_dir, mmap=not pending).describe()
    for key, value in described.items():
        if key not in ("metric", "dim", "index_type", "read_only"):
            table.add_row(key, str(value))
    size = sum(f.stat().st_size for f in Path(index_dir).iterdir() if f.is_file())
    table.add_row("size on disk", f"{size / 1024**2:,.1f} MB")
    console.print(table)


# ------------------------------------------------------------------------------------ search


@app.command("search")
def search_cmd(
    index_dir: Path = typer.Argument(..., help="Index folder from `retrieval index build`."),
    images: list[str] = typer.Argument(
        ..., help="Query image files, folders, or built-in references such as fashion-mnist:test:0."
    ),
    k: int = typer.Option(10, "--k", min=1, max=1000, help="Neighbours per query."),
    model: Path | None = typer.Option(
        None, "--model", help="Checkpoint; default: the one the index was built with."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    out: Path | None = typer.Option(None, "--out", help="Write a PNG grid of the results."),
    nprobe: int | None = typer.Option(None, "--nprobe", help="IVF lists to visit (IVF indexes)."),
    ef_search: int | None = typer.Option(
        None, "--ef-search", help="HNSW search depth (HNSW indexes)."
    ),
    mmap: bool = typer.Option(
        False, "--mmap", help="Memory-map the index instead of reading it (large indexes)."
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps."),
) -> None:
    """Find the images of an index most similar to each query image (one batched search)."""
    from rich.text import Text

    from retrieval.serving.service import SearchService

    service = SearchService(index_dir, model, device=device, mmap=mmap)
    paths = _expand_queries(images)
    raw = [_read_query(p) for p in paths]
    hits = service.search(raw, k, nprobe=nprobe, ef_search=ef_search)
    results = [{"query": p, "results": [vars(h) for h in hits[q]]} for q, p in enumerate(paths)]
    metric = service.index.manifest.metric
    score_name = "similarity" if metric == "cosine" else "distance"
    if as_json:
        sys.stdout.write(json.dumps({"metric": metric, "queries": results}, indent=2) + "\n")
    else:
        for res in results:
            # a Text title: rich would turn ':train:' in fashion-mnist:train:0 into an emoji
            table = Table(title=Text(f"query: {res['query']}"))
            for col, just in (
                ("rank", "right"),
                ("id", "right"),
                (score_name, "right"),
                ("label", "left"),
                ("path", "left"),
            ):
                table.add_column(col, justify=just)
            for h in res["results"]:
                table.add_row(
                    str(h["rank"]), str(h["id"]), f"{h['score']:.4f}", h["label"], h["ref"]
                )
            console.print(table)
    if out is not None:
        rows = []
        for q, res in enumerate(results):
            tiles = [
                Tile(read_ref(h["ref"]), f"{h['rank']}. {h['label']}\n{h['score']:.3f}")
                for h in res["results"]
            ]
            rows.append((Tile(raw[q], Path(res["query"]).name[:18]), tiles))
        neighbour_grid(rows, out)
        if not as_json:
            console.print(f"wrote {out}")


# ------------------------------------------------------------------------------------ serve


@app.command("serve")
def serve_cmd(
    index_dir: Path = typer.Argument(..., help="Index folder from `retrieval index build`."),
    model: Path | None = typer.Option(
        None, "--model", help="Checkpoint; default: the one the index was built with."
    ),
    host: str = typer.Option(
        "127.0.0.1", help="Address to bind; the default serves this machine only."
    ),
    port: int = typer.Option(8000, help="TCP port."),
    token: str | None = typer.Option(
        None,
        "--token",
        help="API token required by the "
        "write endpoints (POST/DELETE /images); default: "
        "$RETRIEVAL_API_TOKEN, else none.",
    ),
    uploads: Path | None = typer.Option(
        None,
        "--uploads",
        help="Folder for added images (default: INDEX_DIR-uploads beside the index).",
    ),
    max_upload_mb: float = typer.Option(
        10.0, "--max-upload-mb", min=0.01, help="Largest upload accepted (413 above)."
    ),
    mmap: bool = typer.Option(
        False, "--mmap", help="Memory-map the index (read-only: adds and removes are refused)."
    ),
    device: str = typer.Option("cpu", help="auto | cpu | cuda | mps."),
) -> None:
    """Serve the search page and HTTP API (docs at /docs) for an index."""
    from retrieval.serving.server import serve

    logging.getLogger("retrieval").setLevel(logging.INFO)
    serve(
        index_dir,
        model,
        host=host,
        port=port,
        token=token,
        uploads_dir=uploads,
        mmap=mmap,
        device=device,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
    )


# ------------------------------------------------------------------------------------ evaluate


#: Evaluation protocols of ``retrieval evaluate`` (``auto`` picks one, see its help).
PROTOCOLS = ("auto", "leave-one-out", "query-gallery", "cross-domain")


@app.command("evaluate")
def evaluate_cmd(
    source: str = typer.Argument(f"{BUILTIN}:test", help="Evaluation images (the queries)."),
    model: Path | None = typer.Option(None, "--model", help="Checkpoint to evaluate."),
    pixels: bool = typer.Option(False, "--pixels", help="Evaluate raw pixels (a baseline)."),
    classes: str | None = typer.Option(
        None,
        help="Classes to evaluate on; default 5-9 for "
        "the built-in set (the unseen classes), else all. "
        "Filters the queries only with --gallery.",
    ),
    split: str | None = typer.Option(None, help="Split (built-in or CSV split column)."),
    ks: str = typer.Option(
        ",".join(map(str, DEFAULT_KS)), help="k's of recall@k, precision@k and MAP@k."
    ),
    metric: str = typer.Option("cosine", help=f"{' | '.join(METRICS)}."),
    protocol: str = typer.Option(
        "auto",
        help="leave-one-out | query-gallery (CSV columns "
        "is_query, is_gallery) | cross-domain (needs --gallery) | auto "
        "(cross-domain with --gallery, query-gallery for a CSV with "
        "those columns, else leave-one-out).",
    ),
    gallery: str | None = typer.Option(
        None,
        "--gallery",
        help="Gallery source for the cross-domain protocol (classes matched by name).",
    ),
    gallery_split: str | None = typer.Option(
        None, "--gallery-split", help="Split of the --gallery source."
    ),
    clustering: bool = typer.Option(
        True, "--clustering/--no-clustering", help="NMI and AMI of k-means on the queries."
    ),
    report: Path | None = typer.Option(
        None,
        "--report",
        help="Write a report folder: metrics.json, report.md, report.html, pictures.",
    ),
    map_method: str = typer.Option("pca", "--map", help="2-D map in the report: pca | tsne."),
    examples: int = typer.Option(
        8, "--examples", min=0, max=64, help="Example and worst queries drawn in the report."
    ),
    per_class: bool = typer.Option(False, "--per-class", help="Also print the per-class table."),
    data_root: Path | None = typer.Option(None, help="Folder of the built-in dataset."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps."),
) -> None:
    """Retrieval metrics: recall@k, precision@k, MAP@k, MAP@R, R-precision, MRR, NMI, AMI."""
    from retrieval.evaluation.evaluate import align_labels, evaluate, read_query_gallery_flags
    from retrieval.evaluation.evaluate import split_query_gallery as split_qg
    from retrieval.evaluation.report import MAP_METHODS, metric_columns, write_report

    if (model is None) == (not pixels):
        raise UserError("give either --model CHECKPOINT or --pixels")
    if report is not None:  # before the work, not after it
        from retrieval.atomic import check_replaceable, real_path
        from retrieval.evaluation.report import is_report_folder

        check_replaceable(real_path(report), is_report_folder, "a report folder")
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if map_method not in MAP_METHODS:
        raise UserError(f"unknown --map {map_method!r}; choose one of {', '.join(MAP_METHODS)}")
    if protocol == "auto":
        has_flags = (
            source.lower().endswith(".csv")
            and Path(source).is_file()
            and {"is_query", "is_gallery"}
            <= set(
                Path(source).open(encoding="utf-8").readline().strip().replace(" ", "").split(",")
            )
        )
        protocol = "cross-domain" if gallery else "query-gallery" if has_flags else "leave-one-out"
    if (protocol == "cross-domain") != (gallery is not None):
        raise UserError(
            "the cross-domain protocol needs --gallery SOURCE, and --gallery "
            "needs the cross-domain protocol"
        )
    ks_t = _ks(ks)
    if classes is None and source.startswith(BUILTIN):
        classes = "5-9"
    state = None
    if model is not None:
        net, state = load_model(model)

    def vectors(ds: ImageDataset, what: str) -> np.ndarray:
        if state is None:
            return pixel_vectors(ds)
        return _embed_with_progress(
            net, ds.with_transform(preprocessing(state)), pick_device(device), what
        )

    size = state["model_config"]["image_size"] if state is not None else None
    ds = _open(source, split, classes, data_root, size)
    x = vectors(ds, source)
    names = ds.class_names
    if protocol == "leave-one-out":
        qds = gds = ds
        xq, yq, xb, yb, self_index = x, ds.labels, None, None, None
    elif protocol == "query-gallery":
        is_q, is_g = read_query_gallery_flags(source, split)
        q_pos, g_pos, self_index = split_qg(is_q[ds.index], is_g[ds.index])
        qds, gds = ds.subset(q_pos), ds.subset(g_pos)
        xq, yq, xb, yb = x[q_pos], ds.labels[q_pos], x[g_pos], ds.labels[g_pos]
    else:
        gds = open_source(gallery, split=gallery_split, root=data_root, draft_size=size)
        qds = ds
        xq, xb = x, vectors(gds, gallery)
        yq, yb, names = align_labels(ds.labels, ds.class_names, gds.labels, gds.class_names)
        self_index = None
    ev = evaluate(
        xq,
        yq,
        xb,
        yb,
        ks=ks_t,
        metric=metric,
        self_index=self_index,
        clustering=clustering,
        class_names=names,
    )
    name = str(model) if model is not None else "raw pixels"
    info = {
        "name": report.name if report is not None else name,
        "model": name,
        "source": source,
        "split": split,
        "classes": classes or "all",
        "protocol": protocol,
    }
    if gallery is not None:
        info |= {"gallery": gallery, "gallery_split": gallery_split}
    if report is not None:
        write_report(
            report,
            ev,
            xq,
            yq,
            x if xb is None else xb,
            yq if yb is None else yb,
            names,
            info,
            query_image=qds.image,
            gallery_image=gds.image,
            query_refs=qds.refs,
            map_method=map_method,
            examples=examples,
        )
    if as_json:
        doc = {"model": name, "metric": metric, "protocol": protocol, **ev.metrics}
        if per_class:
            doc["per_class"] = ev.per_class
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    console.print(
        f"{source} classes {classes or 'all'}, {protocol}: {ev.metrics['queries']} "
        f"queries ({ev.metrics['skipped_queries']} without a relevant item left out), "
        f"gallery {ev.metrics['gallery']}, {metric}"
    )
    table = Table()
    table.add_column("metric")
    table.add_column(name, justify="right")
    for key, head in metric_columns(ev.metrics, ks_t):
        table.add_row(head, f"{ev.metrics[key]:.4f}")
    console.print(table)
    if per_class:
        pc = Table(title="per class")
        keys = [f"recall@{ks_t[0]}", "map@r", "r_precision", "mrr"]
        for col in ("class", "queries", *keys):
            pc.add_column(col, justify="left" if col == "class" else "right")
        for row in ev.per_class:
            pc.add_row(row["class"], str(row["queries"]), *[f"{row[k]:.3f}" for k in keys])
        console.print(pc)
    if report is not None:
        console.print(f"wrote {report / 'report.html'}, report.md and metrics.json")


@app.command("compare")
def compare_cmd(
    runs: list[Path] = typer.Argument(
        ...,
        help="Runs: report folders (with metrics.json) "
        "or metrics JSON files (from --report or --json).",
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Write a folder with compare.md, a self-contained compare.html and recall.png.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Put evaluated runs side by side: a table of metrics and overlaid recall@k curves."""
    from retrieval.atomic import check_replaceable, real_path
    from retrieval.evaluation.report import (
        comparison_table,
        is_comparison_folder,
        load_run,
        unique_names,
        write_comparison,
    )

    if out is not None:
        check_replaceable(real_path(out), is_comparison_folder, "a comparison folder")
    loaded = [load_run(p) for p in runs]
    if as_json:
        doc = {n: r.metrics for n, r in zip(unique_names(loaded), loaded, strict=True)}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        head, body = comparison_table(loaded)  # one row per run: shown transposed
        table = Table(title=f"{len(loaded)} runs")
        table.add_column("metric")
        for row in body:
            table.add_column(row[0], justify="right")
        for c, col in enumerate(head[1:], start=1):
            table.add_row(col, *[row[c] for row in body])
        console.print(table)
    if out is not None:
        write_comparison(out, loaded)
        if not as_json:
            console.print(f"wrote {out / 'compare.html'}, compare.md and recall.png")


# ------------------------------------------------------------------------------------ demo


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("demo-output"), "--out", help="Folder for the results."),
    epochs: int = typer.Option(2, help="Training epochs."),
    data_root: str | None = typer.Option(None, help="Folder of the built-in dataset."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps."),
) -> None:
    """Train on Fashion-MNIST classes 0-4, then index, evaluate and search unseen classes 5-9."""
    from retrieval.demo import run_demo

    with _progress(transient=True) as bar:  # the stage lines stay, the bar goes
        task = bar.add_task("demo", total=None, info="")

        def on_step(s: StepInfo) -> None:
            bar.update(
                task,
                total=s.steps,
                completed=s.step,
                description=f"training epoch {s.epoch}/{epochs}",
                info=f"loss {s.loss:.4f}  {s.images_per_s:,.0f} img/s",
            )

        def on_stage(text: str) -> None:
            bar.update(task, description=text, total=None, completed=0, info="")
            bar.console.print(f"• {text}")

        result = run_demo(
            out,
            epochs=epochs,
            data_root=data_root,
            device=device,
            on_step=on_step,
            on_stage=on_stage,
        )
    console.print(
        _metrics_table(
            result["table"],
            DEFAULT_KS,
            "Fashion-MNIST, unseen classes 5-9 (test split), leave-one-out",
        )
    )
    console.print(
        f"results: {out / 'results.json'}, {out / 'results.md'}; "
        f"picture: {out / 'queries.png'}; model: {result['checkpoint']}; "
        f"index: {result['index']}  ({result['seconds']:.0f} s)"
    )


# ------------------------------------------------------------------------------------ export


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="Checkpoint (.pt) from `retrieval train`."),
    onnx: Path | None = typer.Option(
        None, "--onnx", help="Write an ONNX model here (dynamic batch axis)."
    ),
    torchscript: Path | None = typer.Option(
        None, "--torchscript", help="Write a TorchScript model here."
    ),
    check: bool = typer.Option(
        True,
        "--check/--no-check",
        help="Run each exported model on a "
        "random batch and compare with PyTorch (ONNX needs "
        "onnxruntime).",
    ),
) -> None:
    """Export the embedding model for serving: images (batch, 3, S, S) -> unit vectors.
    Writes FILE.json beside each model with its preprocessing."""
    from retrieval.model.export import (
        TOLERANCE,
        export_onnx,
        export_torchscript,
        max_difference,
        model_card,
    )

    if onnx is None and torchscript is None:
        raise UserError("give --onnx FILE.onnx and/or --torchscript FILE.pt")
    net, state = load_model(checkpoint)
    size = int(state["model_config"]["image_size"])
    digest = file_sha256(checkpoint)
    written = []
    if onnx is not None:
        written.append(("onnx", export_onnx(net, size, onnx, model_card(state, digest, "onnx"))))
    if torchscript is not None:
        written.append(
            (
                "torchscript",
                export_torchscript(
                    net, size, torchscript, model_card(state, digest, "torchscript")
                ),
            )
        )
    for fmt, path in written:
        note = ""
        if check:
            diff = max_difference(net, path, fmt, size)
            if diff > TOLERANCE:
                raise UserError(
                    f"{path}: the exported model differs from PyTorch by {diff:.2e} "
                    f"(more than {TOLERANCE:.0e}); do not use it"
                )
            note = f", max |difference| from PyTorch {diff:.1e}"
        console.print(f"wrote {path} ({fmt}, input {size}x{size}{note}) and {path}.json")


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``retrieval`` command."""
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_time=False, show_path=False)],
    )
    try:
        app(args=argv, prog_name="retrieval")
    except USER_ERRORS as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
