"""``retrieval search`` and ``retrieval serve``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from retrieval.cli._common import DEVICE_HELP, INDEX_MODEL_HELP, app, console

IndexDir = Annotated[Path, typer.Argument(help="Index folder from `retrieval index build`.")]


@app.command("search")
def search_cmd(
    index_dir: IndexDir,
    images: Annotated[
        list[str],
        typer.Argument(
            help="Query image files, folders of images, or built-in references such as "
            "fashion-mnist:test:0."
        ),
    ],
    k: Annotated[int, typer.Option("--k", help="Neighbours per query (1-1000).")] = 10,
    model: Annotated[str | None, typer.Option("--model", help=INDEX_MODEL_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write a PNG grid of the results.")
    ] = None,
    nprobe: Annotated[
        int | None, typer.Option("--nprobe", help="IVF lists to visit (IVF indexes).")
    ] = None,
    ef_search: Annotated[
        int | None, typer.Option("--ef-search", help="HNSW search depth (HNSW indexes).")
    ] = None,
    mmap: Annotated[
        bool,
        typer.Option("--mmap", help="Memory-map the index instead of reading it (large indexes)."),
    ] = False,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    match: Annotated[
        bool,
        typer.Option(
            "--match",
            help="Label each query with its match's label or 'no match' (needs `retrieval "
            "calibrate`, or --cutpoint DISTANCE).",
        ),
    ] = False,
    cutpoint: Annotated[
        str | None,
        typer.Option(
            "--cutpoint", help="With --match: a cut-point name (default best_f1) or a distance."
        ),
    ] = None,
    where: Annotated[
        list[str] | None,
        typer.Option(
            "--where",
            help="Only results matching FIELD=VALUE[,VALUE...] (fields: label, id, ref), e.g. "
            "label=Sneaker; repeat to AND conditions.",
        ),
    ] = None,
) -> None:
    """Find the images of an index most similar to each query image (one batched search)."""
    from retrieval.errors import UserError
    from retrieval.index.filters import parse_where
    from retrieval.workflows import cutpoint_of, decide, search_index

    if not 1 <= k <= 1000:
        raise UserError(f"--k takes a whole number from 1 to 1000, got {k}")
    if cutpoint is not None and not match:
        raise UserError("--cutpoint goes with --match")
    cut = cutpoint_of(index_dir, cutpoint) if match else None  # before the work
    filt = parse_where(where or [])
    metric, results = search_index(
        index_dir, images, k, model, nprobe, ef_search, mmap, device, where=filt
    )
    decisions = decide(results, metric, cut) if match else [None] * len(results)
    score_name = "similarity" if metric == "cosine" else "distance"
    if as_json:
        doc = {
            "metric": metric,
            **({"where": filt} if filt else {}),
            "queries": [
                {"query": r.query, "results": [vars(h) for h in r.hits]}
                | ({"decision": d} if match else {})
                for r, d in zip(results, decisions, strict=True)
            ],
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        from rich.table import Table
        from rich.text import Text

        for r, decision in zip(results, decisions, strict=True):
            # a Text title: rich would turn ':train:' in fashion-mnist:train:0 into an emoji
            title = Text(f"query: {r.query}")
            if filt:
                conditions = (f"{f}={','.join(v)}" for f, v in filt.items())
                title.append("  where " + " and ".join(conditions))
            if decision is not None:
                style = "bold red" if decision == "no match" else "bold green"
                title.append(f"  -> {decision}", style=style)
            table = Table(title=title)
            for col, just in (
                ("rank", "right"),
                ("id", "right"),
                (score_name, "right"),
                ("label", "left"),
                ("path", "left"),
            ):
                table.add_column(col, justify=just)
            for h in r.hits:
                table.add_row(str(h.rank), str(h.id), f"{h.score:.4f}", h.label, h.ref)
            console.print(table)
    if out is not None:
        from data.datasets import read_ref
        from retrieval.evaluation.plots import Tile, neighbour_grid
        from retrieval.workflows import read_query

        rows = []
        for r in results:
            tiles = [Tile(read_ref(h.ref), f"{h.rank}. {h.label}\n{h.score:.3f}") for h in r.hits]
            rows.append((Tile(read_query(r.query), Path(r.query).name[:18]), tiles))
        neighbour_grid(rows, out)
        if not as_json:
            console.print(f"wrote {out}")


@app.command("serve")
def serve_cmd(
    index_dir: IndexDir,
    model: Annotated[str | None, typer.Option("--model", help=INDEX_MODEL_HELP)] = None,
    host: Annotated[
        str, typer.Option(help="Address to bind; the default serves this machine only.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="API token required by the write endpoints (POST/DELETE /images); default: "
            "$RETRIEVAL_API_TOKEN, else none.",
        ),
    ] = None,
    uploads: Annotated[
        Path | None,
        typer.Option(
            "--uploads", help="Folder for added images (default: INDEX_DIR-uploads beside it)."
        ),
    ] = None,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", help="Largest upload accepted (413 above).")
    ] = 10.0,
    mmap: Annotated[
        bool,
        typer.Option(
            "--mmap", help="Memory-map the index (read-only: adds and removes are refused)."
        ),
    ] = False,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
    max_batch: Annotated[
        int,
        typer.Option(
            "--max-batch", help="Most searches sharing one forward pass; 1 turns batching off."
        ),
    ] = 32,
    max_wait_ms: Annotated[
        float,
        typer.Option(
            "--max-wait-ms", help="Longest a search waits for others to join its batch, ms."
        ),
    ] = 2.0,
    max_decodes: Annotated[
        int | None,
        typer.Option(
            "--max-decodes",
            help="Uploads and thumbnails decoded at once (default: the cores, at least 2).",
        ),
    ] = None,
) -> None:
    """Serve the search page and HTTP API (docs at /docs) for an index."""
    import logging

    from retrieval.errors import UserError
    from retrieval.serving.server import DEFAULT_MAX_DECODES, serve

    if not max_upload_mb > 0:
        raise UserError(f"--max-upload-mb must be positive, got {max_upload_mb}")
    if (
        max_batch < 1
        or not 0 <= max_wait_ms <= 100
        or (max_decodes is not None and max_decodes < 1)
    ):
        raise UserError(
            "--max-batch and --max-decodes take whole numbers of at least 1, --max-wait-ms a "
            "number from 0 to 100"
        )
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
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_decodes=max_decodes or DEFAULT_MAX_DECODES,
    )
