"""What the commands share: the consoles, progress display, option parsers and tables.

Nothing here imports torch, FAISS or the web stack: ``retrieval --help`` stays instant.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from retrieval.errors import UserError

app = typer.Typer(
    help="Deep metric learning and image retrieval: train, index, search, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
index_app = typer.Typer(help="Build, change and inspect FAISS indexes.", no_args_is_help=True)
app.add_typer(index_app, name="index")

console = Console()
err_console = Console(stderr=True)

#: Without a terminal (output to a file or a pipe) a progress line is printed at most this often.
LINE_INTERVAL_S = 30.0
#: ``--model`` help of the commands that embed images.
MODEL_HELP = (
    "A checkpoint (.pt) from `retrieval train`; or a pretrained backbone by name: "
    "efficientnet_lite0 (offline, with the [pretrained] extra), resnet18/34/50, "
    "mobilenet_v3_small/large, efficientnet_b0, convnext_tiny (torchvision's ImageNet weights, "
    "downloaded once; also NAME:imagenet); or NAME:FILE, torchvision-format weights of NAME."
)
#: ``--model`` help of the commands that use an index's model.
INDEX_MODEL_HELP = "Model (as for `index build`); default: the one the index was built with."
#: ``--image-size`` help.
IMAGE_SIZE_HELP = "Input side in pixels; default: the model's own (224 for named models)."
#: ``--labels`` help, shared by the commands that open a source of images.
LABELS_HELP = (
    "How images are labelled: from-folders (a folder's first-level sub-folders; images directly "
    "in the folder take its name; a CSV's label column) or none (every image 'unlabelled')."
)
#: Device option help, shared by the commands that run a network.
DEVICE_HELP = "auto | cpu | cuda | mps."


class ProgressLines:
    """Progress for a log file or a pipe: a plain line per task at most every
    :data:`LINE_INTERVAL_S` seconds and when a task completes, instead of a live bar that would
    show nothing until the end. The subset of :class:`rich.progress.Progress` the commands use.
    """

    def __init__(self, console: Console, interval: float = LINE_INTERVAL_S):
        self.console = console
        self.interval = interval
        self._tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        task = len(self._tasks)
        now = time.monotonic()
        self._tasks[task] = {
            "description": description,
            "total": total,
            "completed": 0,
            "start": now,
            "last": now,
            "done": False,
            **fields,
        }
        return task

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, completed=self._tasks[task]["completed"] + advance)

    def update(self, task: int, **changes: Any) -> None:
        t = self._tasks[task]
        t.update(changes)
        now = time.monotonic()
        total = t["total"]
        if total is not None and t["completed"] < total:
            t["done"] = False  # restarted (a new epoch)
        finished = total is not None and t["completed"] >= total and not t["done"]
        if finished or now - t["last"] >= self.interval:
            t["last"] = now
            t["done"] = t["done"] or finished
            self.console.print(self._line(t, now), highlight=False, soft_wrap=True)

    @staticmethod
    def _line(t: dict[str, Any], now: float) -> str:
        done, total = t["completed"], t["total"]
        elapsed = now - t["start"]
        count = f"{done:,.0f}/{total:,.0f}" if total else f"{done:,.0f}"
        eta = ""
        if total and 0 < done < total:
            eta = f", about {elapsed * (total - done) / done:,.0f} s left"
        info = f"  {t['info']}" if t.get("info") else ""
        return f"{t['description']}: {count}{info} ({elapsed:,.0f} s{eta})"


class RateColumn(ProgressColumn):
    """Items per second of a task with a total (images embedded), blank otherwise."""

    def render(self, task) -> Text:
        if task.total is None or not task.speed or task.fields.get("info"):
            return Text("")
        return Text(f"{task.speed:,.1f}/s")


def progress(transient: bool = False) -> AbstractContextManager:
    """A live bar on a terminal, periodic lines otherwise (:class:`ProgressLines`)."""
    if not err_console.is_terminal:
        return ProgressLines(err_console)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
    )


def bar_factory(bar) -> Callable[[str, int], Callable[[int], None]]:
    """A :data:`retrieval.workflows.ProgressFactory` drawing on ``bar``."""

    def factory(what: str, total: int) -> Callable[[int], None]:
        task = bar.add_task(what, total=total, info="")
        return lambda n: bar.advance(task, n)

    return factory


def parse_ks(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)``; positive whole numbers only."""
    try:
        ks = tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        raise UserError(f"--ks takes whole numbers separated by commas, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise UserError(f"--ks takes positive whole numbers, got {text!r}")
    return ks


def key_values(items: list[str] | None, option: str) -> dict | None:
    """``["margin=0.5", ...]`` -> ``{"margin": 0.5}`` (values read as YAML scalars)."""
    if not items:
        return None
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{option} takes KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def metrics_table(rows: dict[str, dict], ks, title: str) -> Table:
    """Recall@k and MAP@R of several models, one row each."""
    table = Table(title=title)
    table.add_column("model")
    for k in ks:
        table.add_column(f"R@{k}", justify="right")
    table.add_column("MAP@R", justify="right")
    for name, m in rows.items():
        table.add_row(name, *[f"{m[f'recall@{k}']:.3f}" for k in ks], f"{m['map@r']:.3f}")
    return table
