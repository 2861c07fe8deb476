"""Evaluation reports on disk, and the comparison of several runs.

A report is a folder written atomically (:func:`retrieval.atomic.atomic_dir`):

- ``metrics.json``: :data:`FORMAT` version :data:`VERSION` — what was evaluated (``info``),
  the overall metrics, the recall@k curve and the per-class rows;
- ``report.md``: the same tables, with links to the pictures beside it;
- ``report.html``: one self-contained page (pictures embedded as base64), to mail or archive;
- ``recall.png``, ``map.png``, and — when the images are at hand — ``examples.png`` (random
  queries with their top-k neighbours, right ones framed green, wrong ones red) and
  ``worst.png`` (the queries with the lowest AP@R).

A *run*, for :func:`load_run` and ``retrieval compare``, is a report folder (its
``metrics.json`` is read) or a metrics JSON file: a report's ``metrics.json`` or the output of
``retrieval evaluate --json``.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retrieval.atomic import atomic_dir
from retrieval.errors import UserError
from retrieval.evaluation.evaluate import Evaluation
from retrieval.evaluation.plots import Tile, neighbour_grid
from retrieval.evaluation.report_plots import embedding_map, recall_curves
from retrieval.index.knn import knn, normalize

logger = logging.getLogger(__name__)

FORMAT = "metric-retrieval/metrics"
VERSION = 1
METRICS_FILE = "metrics.json"
#: Files of a report folder besides its pictures (``*.png``), and of a comparison folder.
REPORT_FILES = frozenset({METRICS_FILE, "report.md", "report.html"})
COMPARISON_FILES = frozenset({"compare.md", "compare.html"})
#: Ways to draw the embeddings in 2-D.
MAP_METHODS = ("pca", "tsne")
#: Points drawn in the 2-D map (a random subsample beyond this; t-SNE is quadratic).
MAP_POINTS = 2000
#: Example queries, worst queries, and neighbours shown per query.
DEFAULT_EXAMPLES = 8
DEFAULT_NEIGHBOURS = 8

ImageFn = Callable[[int], torch.Tensor]


# ------------------------------------------------------------------------------------ pieces


def metric_columns(metrics: dict, ks: Sequence[int]) -> list[tuple[str, str]]:
    """``(key, heading)`` of the headline metrics present in ``metrics``, in display order."""
    cols = [(f"recall@{k}", f"R@{k}") for k in ks]
    cols += [(f"precision@{k}", f"P@{k}") for k in ks if k > 1]
    cols += [(f"map@{k}", f"MAP@{k}") for k in ks if k > 1]
    cols += [("map@r", "MAP@R"), ("r_precision", "R-prec"), ("mrr", "MRR")]
    cols += [("nmi", "NMI"), ("ami", "AMI")]
    return [(key, head) for key, head in cols if key in metrics]


def project_2d(
    x: np.ndarray, method: str = "pca", max_points: int = MAP_POINTS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """2-D coordinates of (a random subsample of) the rows of ``x``: ``(points, positions)``.

    Args:
        x: embeddings ``(n, dim)``.
        method: ``pca`` (fast, linear) or ``tsne`` (scikit-learn t-SNE, shows clusters).
        max_points: subsample size; t-SNE takes seconds per thousand points.
        seed: of the subsample and of t-SNE.

    Example:
        >>> pts, pos = project_2d(np.eye(4, 3), "pca", max_points=3)
        >>> pts.shape, len(pos)
        ((3, 2), 3)
    """
    if method not in MAP_METHODS:
        raise UserError(f"unknown map {method!r}; choose one of {', '.join(MAP_METHODS)}")
    rng = np.random.default_rng(seed)
    positions = np.arange(len(x))
    if len(x) > max_points:
        positions = np.sort(rng.choice(len(x), max_points, replace=False))
    sub = np.asarray(x, dtype=np.float32)[positions]
    if len(sub) < 3:
        raise UserError("the 2-D map needs at least 3 embeddings")
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(sub), positions
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, (len(sub) - 1) / 3))
    tsne = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed)
    return tsne.fit_transform(sub), positions


def worst_queries(ev: Evaluation, count: int) -> np.ndarray:
    """Rows of ``ev``'s evaluated queries with the lowest AP@R (later first hit on ties)."""
    order = np.lexsort((-ev.first_rank, ev.per_query["map@r"]))
    return order[:count]


def metrics_document(ev: Evaluation, info: dict) -> dict:
    """The content of ``metrics.json`` (see the module docstring)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "info": info,
        "metric": ev.metric,
        "ks": list(ev.ks),
        "metrics": ev.metrics,
        "recall_curve": ev.curve,
        "per_class": ev.per_class,
    }


# ------------------------------------------------------------------------------------ writer


def _holds_only(folder: Path, marker: str, names: frozenset[str]) -> bool:
    """``marker`` is in ``folder``, and nothing but files named in ``names`` or ``*.png``."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return False
    return marker in entries and all(
        (name in names or name.endswith(".png")) and (folder / name).is_file() for name in entries
    )


def is_report_folder(folder: str | os.PathLike) -> bool:
    """A folder :func:`write_report` wrote (the only kind it replaces)."""
    return _holds_only(Path(folder), METRICS_FILE, REPORT_FILES)


def is_comparison_folder(folder: str | os.PathLike) -> bool:
    """A folder :func:`write_comparison` wrote (the only kind it replaces)."""
    return _holds_only(Path(folder), "compare.md", COMPARISON_FILES)


def write_report(
    out_dir: str | os.PathLike,
    ev: Evaluation,
    xq: np.ndarray,
    yq: np.ndarray,
    xb: np.ndarray,
    yb: np.ndarray,
    class_names: Sequence[str],
    info: dict,
    query_image: ImageFn | None = None,
    gallery_image: ImageFn | None = None,
    query_refs: Sequence[str] | None = None,
    map_method: str = "pca",
    examples: int = DEFAULT_EXAMPLES,
    neighbours: int = DEFAULT_NEIGHBOURS,
    seed: int = 0,
) -> Path:
    """Write the report folder ``out_dir`` for the evaluation ``ev`` of ``xq`` against ``xb``.

    Args:
        out_dir: the folder (replaced atomically if it exists).
        ev: from :func:`retrieval.evaluation.evaluate.evaluate` on the same arrays.
        xq, yq: query embeddings ``(nq, dim)`` and labels ``(nq,)``.
        xb, yb: gallery embeddings ``(nb, dim)`` and labels ``(nb,)`` (``xq, yq`` for
            leave-one-out).
        class_names: name of each label value.
        info: what was evaluated (model, source, protocol...), stored as is in metrics.json.
        query_image, gallery_image: uint8 ``(3, H, W)`` image of a query / gallery position;
            without them the example and worst-query grids are left out.
        query_refs: a reference (path) per query, listed in the worst-query table.
        map_method: ``pca`` or ``tsne``.
        examples: random example queries, and worst queries, to draw.
        neighbours: neighbours drawn per query.
        seed: of the example choice and the 2-D map.

    Returns:
        ``out_dir`` as a path.
    """
    out_dir = Path(out_dir)
    yq, yb = np.asarray(yq), np.asarray(yb)
    doc = metrics_document(ev, info)
    rng = np.random.default_rng(seed)
    n_eval = len(ev.query_index)
    worst = worst_queries(ev, min(examples, n_eval))
    ev_labels = yq[ev.query_index]
    with atomic_dir(out_dir, owned=is_report_folder, what="a report folder") as tmp:
        images: dict[str, str] = {}
        recall_curves(
            [(info.get("name", "run"), ev.curve["k"], ev.curve["recall"])], tmp / "recall.png"
        )
        images["recall"] = "recall.png"
        xmap = normalize(xq) if ev.metric == "cosine" else xq  # the space the metric sees
        points, positions = project_2d(xmap, map_method, seed=seed)
        shown = {"pca": "PCA", "tsne": "t-SNE"}[map_method]
        embedding_map(
            points,
            yq[positions],
            class_names,
            tmp / "map.png",
            f"{shown} of {len(positions)} of {len(xq)} query embeddings ({ev.metric})",
        )
        images["map"] = "map.png"
        if query_image is not None and gallery_image is not None and examples > 0:
            chosen = np.sort(rng.choice(n_eval, min(examples, n_eval), replace=False))
            for name, rows in (("examples", chosen), ("worst", worst)):
                grid = _neighbour_rows(
                    ev,
                    rows,
                    ev_labels,
                    xq,
                    xb,
                    yb,
                    class_names,
                    query_image,
                    gallery_image,
                    neighbours,
                )
                neighbour_grid(grid, tmp / f"{name}.png")
                images[name] = f"{name}.png"
        worst_rows = [
            {
                "query": int(ev.query_index[w]),
                "ref": query_refs[int(ev.query_index[w])] if query_refs is not None else "",
                "class": class_names[int(ev_labels[w])],
                "map@r": float(ev.per_query["map@r"][w]),
                "first_hit_rank": int(ev.first_rank[w]),
            }
            for w in worst
        ]
        doc["worst_queries"] = worst_rows
        (tmp / METRICS_FILE).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(render_markdown(doc, images), encoding="utf-8")
        embedded = {key: _data_uri(tmp / name) for key, name in images.items()}
        (tmp / "report.html").write_text(render_html(doc, embedded), encoding="utf-8")
        _readable(tmp)
    logger.info("wrote report %s", out_dir)
    return out_dir


def _neighbour_rows(
    ev: Evaluation,
    rows: np.ndarray,
    ev_labels: np.ndarray,
    xq: np.ndarray,
    xb: np.ndarray,
    yb: np.ndarray,
    class_names: Sequence[str],
    query_image: ImageFn,
    gallery_image: ImageFn,
    neighbours: int,
) -> list[tuple[Tile, list[Tile]]]:
    q = ev.query_index[rows]
    k = min(neighbours, len(xb) - int((ev.self_index >= 0).any()))
    _, idx = knn(xq[q], xb, k, ev.metric, ev.self_index[q])
    out = []
    for row, query_pos, nn in zip(rows, q, idx, strict=True):
        label = int(ev_labels[row])
        caption = f"{class_names[label][:14]}\nAP@R {ev.per_query['map@r'][row]:.2f}"
        tiles = [
            Tile(
                gallery_image(int(j)), f"{n}. {class_names[int(yb[j])][:12]}", bool(yb[j] == label)
            )
            for n, j in enumerate(nn, start=1)
        ]
        out.append((Tile(query_image(int(query_pos)), caption), tiles))
    return out


def _readable(folder: Path) -> None:
    """Reports are for sharing: the private modes of temporary files become 755 / 644."""
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# ---------------------------------------------------------------------------------- rendering


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _tables(doc: dict) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    m, ks = doc["metrics"], doc["ks"]
    cols = metric_columns(m, ks)
    head = [h for _, h in cols]
    body = [[_fmt(m[k]) for k, _ in cols]]
    class_cols = [c for c in (f"recall@{ks[0]}", "map@r", "r_precision", "mrr") if c in m]
    class_head = ["class", "queries", *[dict(cols).get(c, c) for c in class_cols]]
    class_body = [
        [str(row["class"]), str(row["queries"]), *[_fmt(row[c]) for c in class_cols]]
        for row in doc["per_class"]
    ]
    return head, body, class_head, class_body


def _md_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _describe(doc: dict) -> list[tuple[str, str]]:
    info, m = doc.get("info", {}), doc["metrics"]
    items = [(k, str(v)) for k, v in info.items() if v is not None]
    items += [
        ("metric", doc.get("metric", "")),
        ("queries evaluated", str(m.get("queries"))),
        ("queries without a relevant item (left out)", str(m.get("skipped_queries"))),
        ("gallery items", str(m.get("gallery"))),
        ("search depth K", str(m.get("depth"))),
    ]
    return items


def render_markdown(doc: dict, images: dict[str, str]) -> str:
    """``report.md``: description, metrics, per-class table, pictures (relative links)."""
    head, body, class_head, class_body = _tables(doc)
    title = doc.get("info", {}).get("name", "evaluation")
    parts = [f"# Retrieval evaluation: {title}", ""]
    parts += [f"- **{k}**: {v}" for k, v in _describe(doc)]
    parts += ["", "## Metrics", "", _md_table(head, body), ""]
    if "recall" in images:
        parts += ["## Recall@k", "", f"![recall@k]({images['recall']})", ""]
    parts += ["## Per class", "", _md_table(class_head, class_body), ""]
    if "map" in images:
        parts += ["## Embedding map", "", f"![map]({images['map']})", ""]
    if "examples" in images:
        parts += [
            "## Example queries",
            "",
            "Right neighbours framed green, wrong red.",
            "",
            f"![examples]({images['examples']})",
            "",
        ]
    parts += ["## Worst queries (lowest AP@R)", ""]
    if "worst" in images:
        parts += [f"![worst]({images['worst']})", ""]
    worst = doc.get("worst_queries", [])
    parts += [
        _md_table(
            ["query", "ref", "class", "AP@R", "first hit rank"],
            [
                [str(w["query"]), w["ref"], w["class"], _fmt(w["map@r"]), str(w["first_hit_rank"])]
                for w in worst
            ],
        ),
        "",
    ]
    return "\n".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px}dt{font-weight:600}"""


def _html_table(head: list[str], body: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body
    )
    return f"<table><thead><tr>{h}</tr></thead><tbody>{rows}</tbody></table>"


def render_html(doc: dict, images: dict[str, str], title: str | None = None) -> str:
    """``report.html``: like the Markdown, with the pictures given as ``data:`` URIs."""
    head, body, class_head, class_body = _tables(doc)
    name = title or doc.get("info", {}).get("name", "evaluation")
    desc = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in _describe(doc))

    def img(key: str, alt: str) -> str:
        return f'<img alt="{alt}" src="{images[key]}">' if key in images else ""

    worst = doc.get("worst_queries", [])
    worst_table = _html_table(
        ["query", "ref", "class", "AP@R", "first hit rank"],
        [
            [str(w["query"]), w["ref"], w["class"], _fmt(w["map@r"]), str(w["first_hit_rank"])]
            for w in worst
        ],
    )
    sections = [
        f"<h1>Retrieval evaluation: {html.escape(name)}</h1><dl>{desc}</dl>",
        "<h2>Metrics</h2>" + _html_table(head, body),
        "<h2>Recall@k</h2>" + img("recall", "recall@k curve"),
        "<h2>Per class</h2>" + _html_table(class_head, class_body),
        "<h2>Embedding map</h2>" + img("map", "2-D map of the embeddings"),
    ]
    if "examples" in images:
        sections.append(
            "<h2>Example queries</h2><p>Right neighbours framed green, wrong red."
            "</p>" + img("examples", "example queries")
        )
    sections.append(
        "<h2>Worst queries (lowest AP@R)</h2>" + img("worst", "worst queries") + worst_table
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(name)}"
        f"</title><style>{_CSS}</style></head><body>{''.join(sections)}</body></html>\n"
    )


# ------------------------------------------------------------------------------------ compare


@dataclass
class Run:
    """One evaluated run, as read by :func:`load_run`."""

    name: str
    path: str
    metrics: dict
    ks: list[int]
    curve: dict | None


def load_run(path: str | os.PathLike) -> Run:
    """Read a run: a report folder or a metrics JSON file (see the module docstring).

    Raises:
        UserError: missing file, invalid JSON, or no metrics in it.
    """
    p = Path(path)
    file = p / METRICS_FILE if p.is_dir() else p
    if not file.is_file():
        raise UserError(f"{p}: neither a report folder with {METRICS_FILE} nor a JSON file")
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{file} does not hold a JSON object of metrics")
    metrics = doc.get("metrics") if isinstance(doc.get("metrics"), dict) else doc
    if not any(k.startswith("recall@") or k == "map@r" for k in metrics):
        raise UserError(f"{file} holds no retrieval metrics (recall@k, map@r)")
    ks = doc.get("ks") or sorted(
        int(k.split("@")[1])
        for k in metrics
        if k.startswith("recall@") and k.split("@")[1].isdigit()
    )
    name = p.name if p.is_dir() else p.stem
    return Run(name=name, path=str(p), metrics=metrics, ks=list(ks), curve=doc.get("recall_curve"))


def unique_names(runs: Sequence[Run]) -> list[str]:
    """Run names, made distinct with their parent folder or a number when they repeat."""
    names = [r.name for r in runs]
    out = []
    for r, n in zip(runs, names, strict=True):
        if names.count(n) > 1:
            n = f"{Path(r.path).parent.name}/{n}"
        while n in out:
            n += "'"
        out.append(n)
    return out


def comparison_table(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
    """Heading and rows: one row per run, one column per metric any run has."""
    ks = sorted({k for r in runs for k in r.ks})
    merged: dict = {}
    for r in runs:
        merged.update(r.metrics)
    cols = metric_columns(merged, ks)
    head = ["run", *[h for _, h in cols], "queries"]
    body = [
        [
            name,
            *[_fmt(r.metrics[k]) if k in r.metrics else "-" for k, _ in cols],
            str(r.metrics.get("queries", "-")),
        ]
        for name, r in zip(unique_names(runs), runs, strict=True)
    ]
    return head, body


def _curve_of(run: Run) -> tuple[list[int], list[float]]:
    if run.curve:
        return list(run.curve["k"]), list(run.curve["recall"])
    ks = [k for k in run.ks if f"recall@{k}" in run.metrics]
    return ks, [run.metrics[f"recall@{k}"] for k in ks]


def write_comparison(out_dir: str | os.PathLike, runs: Sequence[Run]) -> Path:
    """Write ``compare.md``, ``compare.html`` (self-contained) and ``recall.png``."""
    if len(runs) < 1:
        raise UserError("nothing to compare")
    out_dir = Path(out_dir)
    head, body = comparison_table(runs)
    names = unique_names(runs)
    with atomic_dir(out_dir, owned=is_comparison_folder, what="a comparison folder") as tmp:
        recall_curves(
            [(n, *_curve_of(r)) for n, r in zip(names, runs, strict=True)], tmp / "recall.png"
        )
        sources = [f"- **{n}**: {r.path}" for n, r in zip(names, runs, strict=True)]
        md = [
            "# Comparison of runs",
            "",
            *sources,
            "",
            _md_table(head, body),
            "",
            "![recall@k](recall.png)",
            "",
        ]
        (tmp / "compare.md").write_text("\n".join(md), encoding="utf-8")
        items = "".join(
            f"<li><b>{html.escape(n)}</b>: {html.escape(r.path)}</li>"
            for n, r in zip(names, runs, strict=True)
        )
        page = (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Comparison</title>"
            f"<style>{_CSS}</style></head><body><h1>Comparison of runs</h1><ul>{items}</ul>"
            f"{_html_table(head, body)}<h2>Recall@k</h2>"
            f"<img alt='recall@k curves' src='{_data_uri(tmp / 'recall.png')}'>"
            "</body></html>\n"
        )
        (tmp / "compare.html").write_text(page, encoding="utf-8")
        _readable(tmp)
    return out_dir
