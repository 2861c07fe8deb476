"""Measure fine-tuning recipes for a pretrained backbone on classes it never saw in training.

Two class-disjoint data sets that install offline:

- ``fashion-mnist``: train on classes 0-4 of the train split (``--per-class`` images of each),
  evaluate leave-one-out on classes 5-9 of the test split (5,000 images);
- ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, written once as PNG class
  folders under ``--out``): train on digits 0-4 (901 images), evaluate on digits 5-9 (896).

Every row is evaluated the same way (same image size, leave-one-out, cosine): the first row is
the pretrained start with no training, then each variant of the recipe after every epoch (the
epoch's ``last.pt``). Training uses no validation split here (the unseen classes are the test).
Writes ``results.json`` and ``results.md`` into ``--out`` and prints the table.

Usage::

    PYTHONPATH=. python scripts/finetune_recipe.py --dataset digits --out runs/recipe-digits
    PYTHONPATH=. python scripts/finetune_recipe.py --dataset fashion-mnist --variants recipe
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from data.datasets import open_source
from retrieval.atomic import write_json, write_text
from retrieval.evaluation.evaluate import evaluate
from retrieval.model.checkpoint import load_model, preprocessing
from retrieval.model.embed import embed_dataset, pick_device
from retrieval.training.config import TrainConfig
from retrieval.training.loop import at_most_per_class, train
from retrieval.training.recipe import PRETRAINED_RECIPE

logger = logging.getLogger("finetune_recipe")

#: The metrics of the table.
COLUMNS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi")

#: name -> changes to the recipe (``retrieval.training.recipe.PRETRAINED_RECIPE``).
VARIANTS: dict[str, dict] = {
    "recipe": {},
    "one lr 1e-4, BN adapting": {"lr": 1e-4, "backbone_lr": None, "freeze_bn": False},
    "backbone frozen, head indexed": {"backbone_lr": 0.0, "embedding": "head"},
    "BN adapting": {"freeze_bn": False},
    "backbone lr 1e-5": {"backbone_lr": 1e-5},
    "backbone lr 3e-4": {"backbone_lr": 3e-4},
    "head indexed": {"embedding": "head"},
    "no augmentation": {"augment": False},
    "multi-similarity": {"loss": "multi-similarity", "miner": None},
    "backbone lr 1e-4": {"backbone_lr": 1e-4},
    "backbone lr 3e-4, multi-similarity": {
        "backbone_lr": 3e-4,
        "loss": "multi-similarity",
        "miner": None,
    },
    "backbone lr 3e-4, 1 epoch": {"backbone_lr": 3e-4, "epochs": 1},
    "15 blocks": {"backbone_blocks": 15},
    "12 blocks": {"backbone_blocks": 12},
    "15 blocks, supcon": {"backbone_blocks": 15, "loss": "supcon", "miner": None},
    "15 blocks, backbone lr 1e-5": {"backbone_blocks": 15, "backbone_lr": 1e-5},
    "no warm-up": {"warmup_epochs": 0.0},
    "15 blocks, grid 3": {"backbone_blocks": 15, "pool_grid": 3},
    "12 blocks, grid 3": {"backbone_blocks": 12, "pool_grid": 3},
    "15 blocks, grid 3, backbone lr 1e-5": {
        "backbone_blocks": 15,
        "pool_grid": 3,
        "backbone_lr": 1e-5,
    },
    "15 blocks, grid 3, no augmentation": {
        "backbone_blocks": 15,
        "pool_grid": 3,
        "augment": False,
    },
    "15 blocks, grid 3, backbone lr 1e-4, no augmentation": {
        "backbone_blocks": 15,
        "pool_grid": 3,
        "backbone_lr": 1e-4,
        "augment": False,
    },
    "15 blocks, grid 3, backbone lr 1e-4": {
        "backbone_blocks": 15,
        "pool_grid": 3,
        "backbone_lr": 1e-4,
    },
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("fashion-mnist", "digits"), default="digits")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="rows to train")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--image-size", type=int, default=None, help="default: the recipe's")
    p.add_argument("--per-class", type=int, default=400, help="Fashion-MNIST images per class")
    p.add_argument(
        "--test-per-class",
        type=int,
        default=None,
        help="evaluate on this many test images of each unseen class (default all)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/recipe")
    return p


def write_digits(folder: Path) -> tuple[str, str]:
    """scikit-learn's digits as PNG class folders ``seen/0-4`` and ``unseen/5-9`` (once)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    seen, unseen = folder / "seen", folder / "unseen"
    if not (folder / ".complete").exists():
        digits = load_digits()
        for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
            part = seen if label < 5 else unseen
            (part / str(label)).mkdir(parents=True, exist_ok=True)
            pixels = (image * (255 / 16)).round().astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(part / str(label) / f"{i:04d}.png")
        (folder / ".complete").touch()
    return str(seen), str(unseen)


def sources(args: argparse.Namespace) -> tuple[dict, object]:
    """Training options naming the seen classes, and the unseen-class test set."""
    if args.dataset == "digits":
        seen, unseen = write_digits(Path(args.out) / "digits")
        given, test = {"data": seen, "classes": ""}, open_source(unseen)
    else:
        given = {"data": "fashion-mnist", "classes": "0-4", "per_class": args.per_class}
        test = open_source("fashion-mnist", split="test").filter_classes([5, 6, 7, 8, 9])
    if args.test_per_class is not None:
        test = at_most_per_class(test, args.test_per_class, seed=0)
    return given, test


def score(model, transform, test, device: str) -> dict:
    """The table's metrics of ``model`` on ``test`` (leave-one-out, cosine)."""
    emb = embed_dataset(model, test.with_transform(transform), device=pick_device(device))
    metrics = evaluate(emb, np.asarray(test.labels), ks=(1, 2, 4, 8), clustering=True).metrics
    return {k: round(float(metrics[k]), 4) for k in COLUMNS}


def start_name(cfg: TrainConfig) -> str:
    """The start row's name: the pretrained network as ``cfg`` builds it."""
    parts = []
    if cfg.backbone_blocks is not None:
        parts.append(f"first {cfg.backbone_blocks} blocks")
    if cfg.pool_grid not in (None, 1):
        parts.append(f"grid {cfg.pool_grid}")
    return "pretrained start (no training)" + (", " + ", ".join(parts) if parts else "")


def start_row(cfg: TrainConfig, test, device: str) -> dict:
    """The pretrained start, embedded exactly as a trained checkpoint of this recipe would be
    (same blocks, same pooling, same preprocessing)."""
    from retrieval.model.networks import build_model
    from retrieval.model.pretrained import load_pretrained
    from retrieval.model.resolve import resolve_model

    t0 = time.perf_counter()
    embedder = resolve_model(f"{cfg.arch}:{cfg.pretrained}", image_size=cfg.image_size)
    model = build_model(
        cfg.arch,
        cfg.embedding_dim,
        cfg.embedding,
        stem=embedder.config.stem,
        image_size=cfg.image_size,
        weights=load_pretrained(cfg.arch, cfg.pretrained),
        backbone_blocks=cfg.backbone_blocks,
        pool_grid=cfg.pool_grid,
    ).eval()
    row = score(model, embedder.transform(), test, device)
    return {
        "variant": start_name(cfg),
        "epoch": 0,
        **row,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def run_variant(name: str, base: TrainConfig, test, args: argparse.Namespace) -> list[dict]:
    run = Path(args.out) / name.replace(" ", "_").replace(",", "")
    cfg = replace(base, **VARIANTS[name], out=str(run))
    rows: list[dict] = []
    t0 = time.perf_counter()

    def after_epoch(record: dict) -> None:
        if record.get("baseline"):
            return
        model, state = load_model(run / "last.pt")
        rows.append(
            {
                "variant": name,
                "epoch": record["epoch"],
                **score(model, preprocessing(state), test, args.device),
                "images_per_s": round(record["images_per_s"], 1),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        logger.info("%s", rows[-1])

    train(cfg, on_epoch=after_epoch)
    return rows


def table(rows: list[dict]) -> str:
    head = "| variant | epoch | " + " | ".join(COLUMNS) + " | s |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for r in rows:
        cells = " | ".join(f"{r[k]:.3f}" for k in COLUMNS)
        lines.append(f"| {r['variant']} | {r['epoch']} | {cells} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        print(f"error: unknown variants {unknown}; known: {list(VARIANTS)}", file=sys.stderr)
        return 2
    given, test = sources(args)
    base = TrainConfig.from_dict(PRETRAINED_RECIPE | given | {"val_fraction": 0.0})
    if args.epochs is not None:
        base = replace(base, epochs=args.epochs)
    if args.image_size is not None:
        base = replace(base, image_size=args.image_size)
    base = replace(base, device=args.device)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    started: set[str] = set()
    for name in args.variants:
        cfg = replace(base, **VARIANTS[name])
        if start_name(cfg) not in started:  # each network's own untrained start, once
            started.add(start_name(cfg))
            rows.append(start_row(cfg, test, args.device))
            logger.info("%s", rows[-1])
        rows += run_variant(name, base, test, args)
        write_json(Path(args.out) / "results.json", rows)
    command = "PYTHONPATH=. python scripts/finetune_recipe.py " + shlex.join(argv or sys.argv[1:])
    text = f"`{command}`\n\n{table(rows)}\n"
    write_text(Path(args.out) / "results.md", text)
    print(text)
    print(json.dumps(rows[-1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
