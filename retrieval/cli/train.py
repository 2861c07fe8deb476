"""``retrieval train``: its options are the fields of :class:`TrainConfig`, declared there once."""

from __future__ import annotations

import inspect
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any

import typer

from retrieval.cli._common import app, console, key_values, progress
from retrieval.training.config import TrainConfig, resolve_config

#: Python types of the TrainConfig fields, by their annotation (the module uses postponed
#: annotations, so ``dataclasses.fields`` gives strings).
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _field_parameters() -> list[inspect.Parameter]:
    """One command-line option per :class:`TrainConfig` field, from its metadata."""
    params = []
    for f in fields(TrainConfig):
        help_text = f.metadata["help"]
        default = f.default if f.default is not MISSING else None
        if default not in (None, {}, ""):
            help_text += f" (default {default})"
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        kind = str(f.type).replace(" | None", "")
        if kind == "dict":
            annotation: Any = Annotated[
                list[str] | None, typer.Option(flag, help=help_text, show_default=False)
            ]
        elif kind == "bool":
            flags = f"{flag}/--no-{flag[2:]}"
            annotation = Annotated[
                bool | None, typer.Option(flags, help=help_text, show_default=False)
            ]
        else:
            annotation = Annotated[
                _TYPES[kind] | None, typer.Option(flag, help=help_text, show_default=False)
            ]
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
            )
        )
    return params


def train_cmd(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="YAML file of options; command-line options override it."),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Run folder to continue from its last.pt (only --epochs, --device, "
            "--num-workers and --patience may change).",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Start from a pretrained backbone by name (efficientnet_lite0, resnet50, ... "
            "or NAME:FILE): sets --arch, --pretrained, --stem imagenet and --image-size, which "
            "options given here still override.",
        ),
    ] = None,
    **options: Any,
) -> None:
    """Train an embedding network (default: triplet loss, semi-hard miner, P x K batches).

    `torchrun --nproc_per_node N -m retrieval train ...` trains one model on N processes.
    """
    from retrieval.training.distributed import rank_from_env
    from retrieval.training.loop import StepInfo, train

    given = {}
    for f in fields(TrainConfig):
        value = options.get(f.name)
        if str(f.type) == "dict":
            value = key_values(value, f.metadata.get("flag", f.name))
        if value is not None:
            given[f.name] = value
    if model is not None:
        from retrieval.model.resolve import training_start

        given = training_start(model, given.get("image_size")).as_dict() | given
    cfg = resolve_config(given, config, str(resume) if resume is not None else None)
    if not rank_from_env().is_main:  # torchrun: rank 0 reports for all
        train(cfg, resume=resume is not None)
        return
    with progress() as bar:
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
            if "loss" not in rec:  # the untrained network, before the first epoch
                bar.console.print(f"epoch 0 (no training):{val}")
                return
            bar.console.print(f"epoch {rec['epoch']}: loss {rec['loss']:.4f}{val}")

        summary = train(cfg, on_step=on_step, on_epoch=on_epoch, resume=resume is not None)
    stop = " (early stop)" if summary["stopped_early"] else ""
    if summary.get("epoch") == 0:
        console.print(
            "no epoch beat the pretrained start on the validation classes: best.pt is the "
            "starting network (try a lower --backbone-lr, fewer --epochs or more data)"
        )
    console.print(
        f"best checkpoint: {summary['best_checkpoint']} (epoch {summary['epoch']} "
        f"of {summary['epochs_run']}{stop}); curves: {Path(cfg.out) / 'curves.png'}"
    )


def _with_options(fn):
    """``fn`` with its ``**options`` replaced by one keyword parameter per TrainConfig field."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)  # postponed annotations, evaluated
    fixed = [
        p.replace(annotation=hints[p.name])
        for p in sig.parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    params = fixed + _field_parameters()
    fn.__signature__ = sig.replace(parameters=params, return_annotation=None)
    fn.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return fn


app.command("train")(_with_options(train_cmd))
