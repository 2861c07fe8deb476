"""``retrieval embed`` and ``retrieval index build|add|remove|compact|info``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from retrieval.cli._common import (
    DEVICE_HELP,
    IMAGE_SIZE_HELP,
    INDEX_MODEL_HELP,
    LABELS_HELP,
    MODEL_HELP,
    app,
    bar_factory,
    console,
    index_app,
    progress,
)
from retrieval.errors import UserError

SOURCE_HELP = (
    "fashion-mnist[:train|test], a folder of images (nested at any depth), or a CSV manifest "
    "path[,label][,split]."
)
INDEX_HELP = (
    "FAISS factory string: Flat (exact), HNSW32, IVF1024,Flat, IVF1024,PQ16, OPQ16,IVF1024,PQ16, "
    "SQ8, ... or auto (chosen from the gallery size and --memory-budget)."
)
Split = Annotated[str | None, typer.Option(help="Split (built-in or CSV split column).")]
Classes = Annotated[str | None, typer.Option(help="Keep these classes, e.g. 5-9.")]
DataRoot = Annotated[Path | None, typer.Option(help="Folder of the built-in dataset.")]
Device = Annotated[str, typer.Option(help=DEVICE_HELP)]
Labels = Annotated[str, typer.Option("--labels", help=LABELS_HELP)]
ImageSize = Annotated[int | None, typer.Option("--image-size", help=IMAGE_SIZE_HELP)]


@app.command("embed")
def embed_cmd(
    source: Annotated[str, typer.Argument(help=SOURCE_HELP)],
    model: Annotated[str, typer.Option("--model", help=MODEL_HELP)],
    out: Annotated[
        Path | None, typer.Option("--out", help="Output .npy (ids go to OUT.ids.json).")
    ] = None,
    shards: Annotated[
        Path | None,
        typer.Option(
            "--shards",
            help="Instead of --out: write this process's shard of the gallery into this folder "
            "(one per process under torchrun; for `index build --from-shards`).",
        ),
    ] = None,
    split: Split = None,
    classes: Classes = None,
    data_root: DataRoot = None,
    device: Device = "auto",
    labels: Labels = "from-folders",
    image_size: ImageSize = None,
) -> None:
    """Embed every image of a source into OUT.npy and OUT.ids.json, or a shard per process.

    With --shards, each process of `torchrun --nproc_per_node N -m retrieval embed ...` writes
    its shard of the gallery, for `retrieval index build --from-shards`.
    """
    from retrieval.training.distributed import rank_from_env
    from retrieval.workflows import embed_shard_of_source, embed_to_file

    rank = rank_from_env()
    if (out is None) == (shards is None):
        raise UserError("give either --out FILE.npy or --shards DIR")
    if out is not None and rank.world_size > 1:
        raise UserError(f"{rank.world_size} processes would all write {out}; use --shards DIR")
    with progress(transient=True) as bar:
        if shards is not None:
            path = embed_shard_of_source(
                model,
                source,
                shards,
                split,
                classes,
                data_root,
                device,
                bar_factory(bar),
                labels=labels,
                image_size=image_size,
            )
        else:
            npy, ids, shape = embed_to_file(
                model,
                source,
                out,
                split,
                classes,
                data_root,
                device,
                bar_factory(bar),
                labels=labels,
                image_size=image_size,
            )
    if shards is not None:
        console.print(
            f"rank {rank.rank} of {rank.world_size}: wrote {path} and {path.with_suffix('.npy')}"
        )
    else:
        console.print(f"wrote {npy} {shape} and {ids}")


@index_app.command("build")
def index_build(
    source: Annotated[
        str | None, typer.Argument(help=f"Gallery: {SOURCE_HELP} (or give --from-shards).")
    ] = None,
    model: Annotated[str, typer.Option("--model", help=MODEL_HELP)] = ...,
    out: Annotated[Path, typer.Option("--out", help="Index folder to write.")] = ...,
    from_shards: Annotated[
        Path | None,
        typer.Option(
            "--from-shards",
            help="Instead of SOURCE: the folder of `retrieval embed --shards` (merged part by "
            "part; IVF lists are merged).",
        ),
    ] = None,
    metric: Annotated[str, typer.Option(help="cosine | l2.")] = "cosine",
    index_type: Annotated[str, typer.Option("--index", help=INDEX_HELP)] = "Flat",
    memory_budget: Annotated[
        str,
        typer.Option(
            "--memory-budget", help="Memory the index may use, for --index auto (e.g. 512MB, 4GB)."
        ),
    ] = "2GB",
    nprobe: Annotated[
        int | None,
        typer.Option("--nprobe", min=1, help="IVF lists visited per query by default."),
    ] = None,
    ef_search: Annotated[
        int | None,
        typer.Option("--ef-search", min=1, help="HNSW search depth by default."),
    ] = None,
    on_disk: Annotated[
        bool,
        typer.Option(
            "--on-disk",
            help="IVF types: keep the inverted lists in OUT/index.ivfdata, memory-mapped, never "
            "all in memory (built one shard at a time; the index is then read-only).",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace OUT when it is an index folder already (anything else there is refused).",
        ),
    ] = False,
    split: Split = None,
    classes: Classes = None,
    data_root: DataRoot = None,
    device: Device = "auto",
    labels: Labels = "from-folders",
    image_size: ImageSize = None,
) -> None:
    """Embed a gallery and save a FAISS index folder (index, metadata, manifest)."""
    from retrieval.workflows import BuildSpec, build_index

    spec = BuildSpec(metric, index_type, memory_budget, nprobe, ef_search, on_disk, overwrite)
    with progress(transient=True) as bar:
        index = build_index(
            model,
            out,
            spec,
            source,
            from_shards,
            split,
            classes,
            data_root,
            device,
            bar_factory(bar),
            labels=labels,
            image_size=image_size,
        )
    where = " (inverted lists on disk)" if on_disk else ""
    console.print(
        f"indexed {len(index)} images ({index.manifest.dim}-d, {metric}, "
        f"{index.manifest.index_type}) in {out}{where}"
    )


@index_app.command("add")
def index_add(
    index_dir: Annotated[Path, typer.Argument(help="Index folder from `retrieval index build`.")],
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Image files (labelled --label), folders of class sub-folders or CSV manifests "
            "(labelled by them)."
        ),
    ],
    label: Annotated[
        str | None,
        typer.Option(
            "--label",
            help="Class of the added images (default: their folder's class; 'unlabelled' for "
            "single files).",
        ),
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help=INDEX_MODEL_HELP)] = None,
    device: Device = "auto",
    labels: Labels = "from-folders",
) -> None:
    """Add images to an index; they get new ids (ids are never reused)."""
    from retrieval.workflows import add_to_index

    with progress(transient=True) as bar:
        ids, total = add_to_index(
            index_dir, sources, label, model, device, bar_factory(bar), labels
        )
    span = f"id {ids[0]}" if len(ids) == 1 else f"ids {ids[0]}-{ids[-1]}"
    console.print(f"added {len(ids)} images ({span}) to {index_dir}; it holds {total}")


@index_app.command("remove")
def index_remove(
    index_dir: Annotated[Path, typer.Argument(help="Index folder.")],
    ids: Annotated[
        list[int],
        typer.Argument(help="Ids of the items to remove (see `retrieval search --json`)."),
    ],
) -> None:
    """Remove items from an index by id (all or nothing)."""
    from retrieval.workflows import remove_from_index

    n, total = remove_from_index(index_dir, ids)
    console.print(f"removed {n} items from {index_dir}; it holds {total}")


@index_app.command("compact")
def index_compact(index_dir: Annotated[Path, typer.Argument(help="Index folder.")]) -> None:
    """Fold the journal of recent additions and removals into a new snapshot of the index."""
    from retrieval.workflows import compact_index

    n = compact_index(index_dir)
    console.print(f"{index_dir}: {n} items, journal folded into the snapshot")


@index_app.command("info")
def index_info(index_dir: Annotated[Path, typer.Argument(help="Index folder.")]) -> None:
    """Show what an index holds and what it was built with."""
    from retrieval.workflows import index_info as describe

    table = Table(show_header=False)
    for key, value in describe(index_dir):
        table.add_row(key, value)
    console.print(table)


@index_app.command("repair")
def index_repair(index_dir: Annotated[Path, typer.Argument(help="Index folder.")]) -> None:
    """Cut a damaged journal at its first bad line, keeping every change before it."""
    from retrieval.workflows import repair_index

    kept, dropped = repair_index(index_dir)
    if dropped:
        console.print(
            f"{index_dir}: kept {kept} changes of the journal, dropped {dropped:,} damaged bytes "
            "(the changes in them are lost)"
        )
    else:
        console.print(f"{index_dir}: the journal is whole ({kept} changes); nothing to repair")


@index_app.command("sync")
def index_sync(
    index_dir: Annotated[Path, typer.Argument(help="Index folder.")],
    folder: Annotated[Path, typer.Argument(help="The folder of images the index follows.")],
    model: Annotated[str | None, typer.Option("--model", help=INDEX_MODEL_HELP)] = None,
    labels: Labels = "from-folders",
    device: Device = "auto",
) -> None:
    """Add the folder's new images to the index and remove those deleted from it."""
    from retrieval.workflows import sync_index

    with progress(transient=True) as bar:
        added, removed, total = sync_index(
            index_dir, folder, labels, model, device, bar_factory(bar)
        )
    console.print(f"{index_dir}: added {added}, removed {removed}; it holds {total}")
