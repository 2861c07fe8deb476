"""``retrieval demo`` and ``retrieval export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retrieval.cli._common import (
    DEVICE_HELP,
    IMAGE_SIZE_HELP,
    MODEL_HELP,
    app,
    console,
    metrics_table,
    progress,
)


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for the results.")] = Path(
        "demo-output"
    ),
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 2,
    data_root: Annotated[str | None, typer.Option(help="Folder of the built-in dataset.")] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
) -> None:
    """Train on Fashion-MNIST classes 0-4, then index, evaluate and search unseen classes 5-9."""
    from retrieval.demo import run_demo
    from retrieval.evaluation.metrics import DEFAULT_KS
    from retrieval.training.loop import StepInfo

    with progress(transient=True) as bar:  # the stage lines stay, the bar goes
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
        metrics_table(
            result["table"],
            DEFAULT_KS,
            "Fashion-MNIST, unseen classes 5-9 (test split), leave-one-out",
        )
    )
    console.print(
        f"results: {out / 'results.json'}, {out / 'results.md'}; picture: {out / 'queries.png'}; "
        f"model: {result['checkpoint']}; index: {result['index']}  ({result['seconds']:.0f} s)"
    )


@app.command("export")
def export_cmd(
    checkpoint: Annotated[str, typer.Argument(help=MODEL_HELP)],
    onnx: Annotated[
        Path | None, typer.Option("--onnx", help="Write an ONNX model here (dynamic batch axis).")
    ] = None,
    torchscript: Annotated[
        Path | None, typer.Option("--torchscript", help="Write a TorchScript model here.")
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check/--no-check",
            help="Run each exported model on a random batch and compare with PyTorch (ONNX "
            "needs onnxruntime).",
        ),
    ] = True,
    image_size: Annotated[int | None, typer.Option("--image-size", help=IMAGE_SIZE_HELP)] = None,
) -> None:
    """Export the embedding model for serving: images (batch, 3, S, S) -> unit vectors.

    Writes FILE.json beside each model with its preprocessing.
    """
    from retrieval.workflows import export_model

    for fmt, path, size, diff in export_model(
        checkpoint, onnx, torchscript, check, image_size=image_size
    ):
        note = f", max |difference| from PyTorch {diff:.1e}" if diff is not None else ""
        console.print(f"wrote {path} ({fmt}, input {size}x{size}{note}) and {path}.json")
