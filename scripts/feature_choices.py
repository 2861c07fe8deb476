"""What to index from a pretrained backbone, measured with no training on unseen classes.

EfficientNet-Lite0 with its ImageNet weights; for the unseen classes of a data set (the same
two as ``scripts/finetune_recipe.py``: Fashion-MNIST 5-9, scikit-learn digits 5-9), leave-one-out
R@1 and MAP@R of:

- the last feature map pooled by average (what is indexed), GeM (p = 3) and max;
- PCA whitening of the averaged features, learned on images of the seen classes 0-4;
- the output of every block of the network, averaged globally and over a 3 x 3 grid (which
  depth transfers best, and whether keeping the layout helps: ``--pool-grid 3``).

Usage::

    PYTHONPATH=. python scripts/feature_choices.py --dataset digits
    PYTHONPATH=. python scripts/feature_choices.py --dataset fashion-mnist --test-per-class 400
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.datasets import open_source
from retrieval.evaluation.evaluate import evaluate
from retrieval.model.resolve import resolve_model
from retrieval.training.loop import at_most_per_class

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_recipe import write_digits  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("fashion-mnist", "digits"), default="digits")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--per-class", type=int, default=400, help="seen images per class (PCA)")
    p.add_argument("--test-per-class", type=int, default=None, help="default: all")
    p.add_argument("--whiten-dims", type=int, nargs="+", default=[128, 256])
    p.add_argument("--out", default="runs/recipe", help="where the digits folders are written")
    return p


def datasets(args: argparse.Namespace):
    if args.dataset == "digits":
        seen, unseen = write_digits(Path(args.out) / "digits")
        seen_ds, test = open_source(seen), open_source(unseen)
    else:
        seen_ds = open_source("fashion-mnist", split="train").filter_classes([0, 1, 2, 3, 4])
        test = open_source("fashion-mnist", split="test").filter_classes([5, 6, 7, 8, 9])
    seen_ds = at_most_per_class(seen_ds, args.per_class)
    if args.test_per_class is not None:
        test = at_most_per_class(test, args.test_per_class)
    return seen_ds, test


def feature_maps(embedder, dataset, per_block: bool) -> dict[str, np.ndarray]:
    """Pooled vectors of ``dataset``: ``avg``, ``gem``, ``max`` and (``per_block``) every
    block's average (``block i``) and 3 x 3 grid average (``grid block i``)."""
    net = embedder.model.backbone.net  # EfficientNet-Lite's own module
    ds = dataset.with_transform(embedder.transform())
    out: dict[str, list] = {}
    hooks = []
    if per_block:
        for i, block in enumerate(net._blocks):

            def keep(module, inputs, output, name=f"block {i}"):
                out.setdefault(name, []).append(F.adaptive_avg_pool2d(output, 1).flatten(1))
                grid = F.adaptive_avg_pool2d(output, 3).flatten(1)
                out.setdefault(f"grid {name}", []).append(grid)

            hooks.append(block.register_forward_hook(keep))
    with torch.inference_mode():
        for start in range(0, len(ds), 128):
            x = torch.stack([ds[j][0] for j in range(start, min(start + 128, len(ds)))])
            fm = net.extract_features(x)
            out.setdefault("avg", []).append(F.adaptive_avg_pool2d(fm, 1).flatten(1))
            gem = F.adaptive_avg_pool2d(fm.clamp(min=1e-6).pow(3), 1).pow(1 / 3)
            out.setdefault("gem", []).append(gem.flatten(1))
            out.setdefault("max", []).append(F.adaptive_max_pool2d(fm, 1).flatten(1))
    for h in hooks:
        h.remove()
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def score(x: np.ndarray, y: np.ndarray) -> str:
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    m = evaluate(x, y, ks=(1,), clustering=False).metrics
    return f"R@1 {m['recall@1']:.3f}  MAP@R {m['map@r']:.3f}"


def main(argv: list[str] | None = None) -> int:
    from sklearn.decomposition import PCA

    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    seen, test = datasets(args)
    embedder = resolve_model("efficientnet_lite0", image_size=args.image_size)
    y = np.asarray(test.labels)
    unseen = feature_maps(embedder, test, per_block=True)
    for name in ("avg", "gem", "max"):
        print(f"pooling {name:4s}          {score(unseen[name], y)}")
    learned = feature_maps(embedder, seen, per_block=False)["avg"]
    for dims in args.whiten_dims:
        pca = PCA(n_components=dims, whiten=True).fit(learned)
        print(f"PCA whitening {dims:4d}-d  {score(pca.transform(unseen['avg']), y)}")
    for name in sorted((k for k in unseen if k.startswith("block")), key=lambda k: int(k[6:])):
        grid = unseen[f"grid {name}"]
        print(
            f"{name:8s} {unseen[name].shape[1]:4d}-d   {score(unseen[name], y)}   "
            f"grid 3: {grid.shape[1]:4d}-d   {score(grid, y)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
