"""``retrieval calibrate`` and ``retrieval duplicates``: decisions on top of the ranking."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retrieval.cli._common import (
    DEVICE_HELP,
    IMAGE_SIZE_HELP,
    INDEX_MODEL_HELP,
    MODEL_HELP,
    app,
    bar_factory,
    console,
    err_console,
    progress,
)


@app.command("calibrate")
def calibrate_cmd(
    index_dir: Annotated[Path, typer.Argument(help="Index folder from `retrieval index build`.")],
    source: Annotated[
        str,
        typer.Argument(help="Labelled queries: fashion-mnist[:split], a class folder or a CSV."),
    ],
    target_precision: Annotated[
        list[float] | None,
        typer.Option("--target-precision", help="Add a cut-point meeting this precision."),
    ] = None,
    target_recall: Annotated[
        list[float] | None,
        typer.Option("--target-recall", help="Add a cut-point meeting this recall."),
    ] = None,
    split: Annotated[str | None, typer.Option(help="Split (built-in or CSV split column).")] = None,
    classes: Annotated[str | None, typer.Option(help="Keep these query classes.")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Folder of the built-in dataset.")] = None,
    model: Annotated[str | None, typer.Option("--model", help=INDEX_MODEL_HELP)] = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Write a PNG: precision/recall/F1 vs threshold, PR curve."),
    ] = None,
    nprobe: Annotated[int | None, typer.Option("--nprobe", help="IVF lists to visit.")] = None,
    ef_search: Annotated[int | None, typer.Option("--ef-search", help="HNSW search depth.")] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
) -> None:
    """Choose distance cut-points for "match" / "no match" on labelled queries.

    Stores calibration.json in the index folder: the best-F1 cut-point and one per target,
    each with its precision, recall and F1 on these queries.
    """
    from rich.table import Table

    from retrieval.evaluation.calibration import describe
    from retrieval.workflows import calibrate_index

    with progress(transient=True) as bar:
        cal = calibrate_index(
            index_dir,
            source,
            target_precision or (),
            target_recall or (),
            split,
            classes,
            data_root,
            model,
            nprobe,
            ef_search,
            device,
            bar_factory(bar),
        )
    rows = describe(cal)
    table = Table(title=f"{cal.queries} queries, {cal.open_set_queries} of classes not indexed")
    for col in rows[0]:
        table.add_column(col, justify="left" if col == "cut-point" else "right")
    for r in rows:
        table.add_row(*[str(v) for v in r.values()])
    console.print(table)
    for name in cal.unmet:
        err_console.print(f"no threshold meets {name} on these queries")
    console.print(f"wrote {Path(index_dir) / 'calibration.json'}")
    if plot is not None:
        from retrieval.evaluation.decision_plots import calibration_curves

        calibration_curves(cal, plot)
        console.print(f"wrote {plot}")


@app.command("duplicates")
def duplicates_cmd(
    target: Annotated[Path, typer.Argument(help="An index folder, or a folder of images.")],
    out: Annotated[Path, typer.Option("--out", help="Report folder to write (new or empty).")],
    threshold: Annotated[
        float | None,
        typer.Option("--threshold", help="Largest distance of two duplicates (1 - cos, or l2)."),
    ] = None,
    cutpoint: Annotated[
        str | None,
        typer.Option("--cutpoint", help="Instead of --threshold: a calibrated cut-point's name."),
    ] = None,
    keep: Annotated[
        str, typer.Option("--keep", help="largest | first: the file kept in each group.")
    ] = "largest",
    model: Annotated[
        str | None, typer.Option("--model", help=f"{MODEL_HELP} Default for an index: its own.")
    ] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help=IMAGE_SIZE_HELP)] = None,
    metric: Annotated[str, typer.Option(help="For a folder of images: cosine | l2.")] = "cosine",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
) -> None:
    """Find groups of near-duplicate images and report which file of each would be kept.

    Writes duplicates.json, duplicates.csv and a picture of the groups. Nothing is deleted.
    """
    from retrieval.workflows import find_duplicates_in

    with progress(transient=True) as bar:
        report = find_duplicates_in(
            target,
            out,
            threshold,
            cutpoint,
            keep,
            model,
            metric,
            device,
            bar_factory(bar),
            image_size=image_size,
        )
    console.print(
        f"{len(report['groups'])} groups of near-duplicates (distance <= "
        f"{report['threshold']:.4g}), {report['files_in_groups']} files; keeping one per group "
        f"({keep}) would remove {report['would_remove']} files "
        f"({report['bytes_freed'] / 1e6:.1f} MB). Nothing was deleted. Wrote {out}"
    )
