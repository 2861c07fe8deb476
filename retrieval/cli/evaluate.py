"""``retrieval evaluate`` and ``retrieval compare``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from retrieval.cli._common import (
    DEVICE_HELP,
    IMAGE_SIZE_HELP,
    LABELS_HELP,
    MODEL_HELP,
    app,
    bar_factory,
    console,
    parse_ks,
    progress,
)

#: The k's reported by default (retrieval.evaluation.metrics.DEFAULT_KS, without importing it).
DEFAULT_KS = "1,2,4,8"


@app.command("evaluate")
def evaluate_cmd(
    source: Annotated[
        str, typer.Argument(help="Evaluation images (the queries).")
    ] = "fashion-mnist:test",
    model: Annotated[str | None, typer.Option("--model", help=MODEL_HELP)] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help=IMAGE_SIZE_HELP)] = None,
    pixels: Annotated[
        bool, typer.Option("--pixels", help="Evaluate raw pixels (a baseline).")
    ] = False,
    classes: Annotated[
        str | None,
        typer.Option(
            help="Classes to evaluate on; default 5-9 for the built-in set (the unseen "
            "classes), else all. Filters the queries only with --gallery."
        ),
    ] = None,
    split: Annotated[str | None, typer.Option(help="Split (built-in or CSV split column).")] = None,
    ks: Annotated[str, typer.Option(help="k's of recall@k, precision@k and MAP@k.")] = DEFAULT_KS,
    metric: Annotated[str, typer.Option(help="cosine | l2.")] = "cosine",
    protocol: Annotated[
        str,
        typer.Option(
            help="leave-one-out | query-gallery (CSV columns is_query, is_gallery) | "
            "cross-domain (needs --gallery) | auto (cross-domain with --gallery, query-gallery "
            "for a CSV with those columns, else leave-one-out)."
        ),
    ] = "auto",
    gallery: Annotated[
        str | None,
        typer.Option(
            "--gallery", help="Gallery source for the cross-domain protocol (classes by name)."
        ),
    ] = None,
    gallery_split: Annotated[
        str | None, typer.Option("--gallery-split", help="Split of the --gallery source.")
    ] = None,
    clustering: Annotated[
        bool,
        typer.Option("--clustering/--no-clustering", help="NMI and AMI of k-means on the queries."),
    ] = True,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="Write a report folder: metrics.json, report.md, report.html, pictures.",
        ),
    ] = None,
    map_method: Annotated[str, typer.Option("--map", help="2-D map in the report: pca | tsne.")] = (
        "pca"
    ),
    examples: Annotated[
        int, typer.Option("--examples", help="Example and worst queries drawn (0-64).")
    ] = 8,
    per_class: Annotated[
        bool, typer.Option("--per-class", help="Also print the per-class table.")
    ] = False,
    data_root: Annotated[Path | None, typer.Option(help="Folder of the built-in dataset.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    labels: Annotated[str, typer.Option("--labels", help=LABELS_HELP)] = "from-folders",
    cutpoint: Annotated[
        str | None,
        typer.Option(
            "--cutpoint",
            help="Also report match / no-match figures (precision, recall, F1, false-positive "
            "rate; open-set queries must come out 'no match') at this distance, or at a "
            "calibrated cut-point: INDEX_DIR or INDEX_DIR:NAME.",
        ),
    ] = None,
) -> None:
    """Retrieval metrics: recall@k, precision@k, MAP@k, MAP@R, R-precision, MRR, NMI, AMI."""
    from rich.table import Table

    from retrieval.errors import UserError
    from retrieval.workflows import evaluate_source

    maps = ("pca", "tsne")
    if map_method not in maps:
        raise UserError(f"unknown --map {map_method!r}; choose one of {', '.join(maps)}")
    if not 0 <= examples <= 64:
        raise UserError(f"--examples takes a whole number from 0 to 64, got {examples}")
    if report is not None:  # before the work, not after it
        from retrieval.atomic import check_replaceable, real_path
        from retrieval.evaluation.report import is_report_folder

        check_replaceable(real_path(report), is_report_folder, "a report folder")
    ks_t = parse_ks(ks)
    with progress(transient=True) as bar:
        run = evaluate_source(
            source,
            model,
            pixels,
            classes,
            split,
            ks_t,
            metric,
            protocol,
            gallery,
            gallery_split,
            clustering,
            data_root,
            device,
            bar_factory(bar),
            labels=labels,
            image_size=image_size,
        )
    ev, info = run.evaluation, run.info
    name = info["model"]
    if cutpoint is not None:
        from retrieval.evaluation.calibration import decision_at
        from retrieval.workflows import cutpoint_of

        folder, _, which = cutpoint.partition(":")
        try:
            threshold = float(cutpoint)
        except ValueError:
            threshold = cutpoint_of(folder, which or None).distance
        decision = decision_at(run.xq, run.yq, threshold, run.xb, run.yb, metric, ev.self_index)
        ev.metrics["decision"] = {"threshold": threshold, **decision}
    if report is not None:
        from retrieval.evaluation.report import write_report

        write_report(
            report,
            ev,
            run.xq,
            run.yq,
            run.xb,
            run.yb,
            run.class_names,
            {"name": report.name, **info},
            query_image=run.queries.image,
            gallery_image=run.gallery.image,
            query_refs=run.queries.refs,
            map_method=map_method,
            examples=examples,
        )
    if as_json:
        doc = {"model": name, "metric": metric, "protocol": info["protocol"], **ev.metrics}
        if per_class:
            doc["per_class"] = ev.per_class
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    from retrieval.evaluation.report import metric_columns

    console.print(
        f"{source} classes {info['classes']}, {info['protocol']}: {ev.metrics['queries']} "
        f"queries ({ev.metrics['skipped_queries']} without a relevant item left out), "
        f"gallery {ev.metrics['gallery']}, {metric}"
    )
    table = Table()
    table.add_column("metric")
    table.add_column(name, justify="right")
    for key, head in metric_columns(ev.metrics, ks_t):
        table.add_row(head, f"{ev.metrics[key]:.4f}")
    console.print(table)
    if cutpoint is not None:
        d = ev.metrics["decision"]
        console.print(
            f"at distance {d['threshold']:.4g}: precision {d['precision']:.3f}  recall "
            f"{d['recall']:.3f}  F1 {d['f1']:.3f}  false-positive rate {d['fpr']:.3f}; "
            f"{d['open_set_no_match']:.1%} of {d['open_set_queries']} open-set queries "
            "answered 'no match'"
        )
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
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="Runs: report folders (with metrics.json) or metrics JSON files (from --report "
            "or --json)."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Write a folder with compare.md, a self-contained compare.html and recall.png.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Put evaluated runs side by side: a table of metrics and overlaid recall@k curves."""
    from rich.table import Table

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
