"""Train each named embedding loss with its natural miner under the same budget and compare them.

Protocol (the demo's): train on Fashion-MNIST classes 0-4 (train split) with the demo's recipe
(small convnet, backbone features indexed, Adam lr 1e-4, no augmentation, P x K = 4 x 32), then
evaluate leave-one-out on the unseen classes 5-9 (test split, 5,000 images). Writes
``docs/results.md`` (and ``results.json`` in the output folder) with recall@1/2/4/8 and MAP@R,
the raw-pixel and untrained-network rows, the command and the time it took.

    python scripts/compare_losses.py --epochs 1 --out runs/compare
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from data.datasets import load_builtin
from data.transforms import eval_transform
from retrieval.atomic import write_json, write_text
from retrieval.demo import SEEN, UNSEEN, demo_config
from retrieval.evaluation.evaluate import evaluate_embeddings, pixel_vectors
from retrieval.evaluation.metrics import DEFAULT_KS
from retrieval.model.checkpoint import load_model, preprocessing
from retrieval.model.embed import embed_dataset, pick_device
from retrieval.model.networks import build_model
from retrieval.training.loop import channel_stats, seed_everything, train
from retrieval.training.objectives import NAMED_LOSSES, TRAINING_LOSSES

logger = logging.getLogger("compare_losses")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1, help="training epochs per loss")
    p.add_argument("--losses", nargs="+", default=list(NAMED_LOSSES), help="losses to compare")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/compare", help="folder of the runs")
    p.add_argument("--results", default="docs/results.md", help="Markdown table to write")
    return p


def baselines(data_root: str | None, device: str, seed: int) -> dict[str, dict]:
    """Raw pixels and the untrained network (the demo's recipe) on the unseen classes."""
    test = load_builtin("test", data_root).filter_classes(UNSEEN)
    table = {"raw pixels": evaluate_embeddings(pixel_vectors(test), test.labels, DEFAULT_KS)}
    cfg = demo_config("unused", 1, data_root, device)
    seed_everything(seed)
    untrained = build_model(cfg.arch, cfg.embedding_dim, cfg.embedding)
    seen = load_builtin("train", data_root).filter_classes(SEEN)
    mean, std = channel_stats(seen, seed=seed)
    emb = embed_dataset(
        untrained,
        test.with_transform(eval_transform(cfg.image_size, mean, std)),
        device=pick_device(device),
    )
    table["untrained network"] = evaluate_embeddings(emb, test.labels, DEFAULT_KS)
    return table


def train_and_evaluate(loss: str, args: argparse.Namespace) -> dict:
    """Train ``loss`` with the demo's recipe; its best checkpoint's metrics on classes 5-9."""
    cfg = replace(
        demo_config(Path(args.out) / loss, args.epochs, args.data_root, args.device), loss=loss
    )
    t0 = time.perf_counter()
    summary = train(cfg)
    model, state = load_model(summary["best_checkpoint"])
    test = load_builtin("test", args.data_root).filter_classes(UNSEEN)
    emb = embed_dataset(
        model, test.with_transform(preprocessing(state)), device=pick_device(args.device)
    )
    scores = evaluate_embeddings(emb, test.labels, DEFAULT_KS)
    scores["miner"] = TRAINING_LOSSES[loss].default_miner
    scores["seconds"] = round(time.perf_counter() - t0, 1)
    scores["val_map@r"] = summary.get("val_map@r")
    return scores


def markdown(
    table: dict[str, dict], untrained: float, command: str, seconds: float, epochs: int
) -> str:
    head = (
        "| model | miner | "
        + " | ".join(f"R@{k}" for k in DEFAULT_KS)
        + " | MAP@R | beats untrained |\n"
    )
    head += "|---" * (len(DEFAULT_KS) + 4) + "|\n"
    rows = []
    for name, m in table.items():
        trained = "miner" in m
        verdict = ("yes" if m["map@r"] > untrained else "**no**") if trained else "—"
        miner = f"`{m['miner']}`" if trained else "—"
        label = f"`{name}`" if trained else name
        rows.append(
            f"| {label} | {miner} | "
            + " | ".join(f"{m[f'recall@{k}']:.3f}" for k in DEFAULT_KS)
            + f" | {m['map@r']:.3f} | {verdict} |\n"
        )
    losing = [n for n, m in table.items() if "miner" in m and m["map@r"] <= untrained]
    honest = (
        "Every loss beats the untrained network's MAP@R."
        if not losing
        else "Not beating the untrained network: "
        + ", ".join(f"`{n}`" for n in losing)
        + ". See the note below."
    )
    return (
        "# Results: one embedding loss at a time\n\n"
        "Fashion-MNIST; trained on classes 0-4 (train split, 10% held out for model selection), "
        "evaluated leave-one-out on the **unseen** classes 5-9 (test split, 5,000 images), "
        "cosine similarity.\n\n"
        f"Same budget for every loss — the demo's recipe: small convnet, {epochs} epoch(s), "
        "P x K = 4 x 32 batches, Adam lr 1e-4, no augmentation, backbone features indexed "
        "(`embedding: features`), 128-d projection head seen by the loss, seed 0; each loss with "
        "its natural miner (`retrieval.training.objectives.TRAINING_LOSSES`).\n\n"
        + head
        + "".join(rows)
        + f"\n{honest}\n\n"
        f"Produced by `{command}` in {seconds / 60:.1f} min on this machine's CPU.\n"
    )


def main(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    table = baselines(args.data_root, args.device, seed=0)
    for loss in args.losses:
        logger.info("training %s", loss)
        table[loss] = train_and_evaluate(loss, args)
        logger.info("%s: MAP@R %.3f (%.0f s)", loss, table[loss]["map@r"], table[loss]["seconds"])
    seconds = time.perf_counter() - t0
    command = "python scripts/compare_losses.py " + shlex.join(sys.argv[1:])
    write_json(
        Path(args.out) / "results.json", {"table": table, "seconds": seconds, "command": command}
    )
    write_text(
        args.results,
        markdown(table, table["untrained network"]["map@r"], command.strip(), seconds, args.epochs),
    )
    print(Path(args.results).read_text(encoding="utf-8"))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main(get_args_parser().parse_args())
