"""What to index from a pretrained backbone, measured with no training on unseen classes.

EfficientNet-Lite0 with its ImageNet weights; for the unseen classes of a data set (the same
two as ``scripts/finetune_recipe.py``: Fashion-MNIST 5-9, scikit-learn digits 5-9), leave-one-out
R@1 and MAP@R of:

- the last feature map pooled by average (what is indexed), GeM (p = 3) and max;
- PCA whitening of the averaged features, learned on images of the seen classes 0-4;
- the output of every block of the network, averaged globally and over a 3 x 3 grid (which
  depth transfers best, and whether keeping the layout helps: ``--pool-grid 3``).

With ``--plot PNG``, a chart of MAP@R against depth (global average and 3 x 3 grid, one
panel per data set), as in docs/results.md.

Usage::

    PYTHONPATH=. python scripts/feature_choices.py --dataset digits
    PYTHONPATH=. python scripts/feature_choices.py --dataset fashion-mnist --test-per-class 400
    PYTHONPATH=. python scripts/feature_choices.py --dataset fashion-mnist digits \
        --plot docs/feature_depth.png
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
    p.add_argument("--dataset", nargs="+", choices=("fashion-mnist", "digits"), default=["digits"])
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--per-class", type=int, default=400, help="seen images per class (PCA)")
    p.add_argument("--test-per-class", type=int, default=None, help="default: all")
    p.add_argument("--whiten-dims", type=int, nargs="+", default=[128, 256])
    p.add_argument("--out", default="runs/recipe", help="where the digits folders are written")
    p.add_argument("--plot", default=None, help="write the MAP@R-by-depth chart here (PNG)")
    return p


def datasets(args: argparse.Namespace, name: str):
    if name == "digits":
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


def metrics(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Leave-one-out R@1 and MAP@R of the L2-normalised rows of ``x``."""
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    m = evaluate(x, y, ks=(1,), clustering=False).metrics
    return float(m["recall@1"]), float(m["map@r"])


def score(x: np.ndarray, y: np.ndarray) -> str:
    r1, map_r = metrics(x, y)
    return f"R@1 {r1:.3f}  MAP@R {map_r:.3f}"


def plot(path: str, curves: dict[str, dict], image_size: int) -> None:
    """MAP@R of every block, globally averaged and on a 3 x 3 grid, one panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 3.8), squeeze=False)
    for ax, (name, c) in zip(axes[0], curves.items(), strict=True):
        depth = np.arange(1, len(c["avg"]) + 1)
        ax.plot(depth, c["avg"], "o-", label="global average")
        ax.plot(depth, c["grid"], "s-", label="3 x 3 grid (--pool-grid 3)")
        ax.axhline(c["indexed"], color="grey", ls="--", label="whole network (the default)")
        ax.set(title=f"{name}, unseen classes 5-9", xlabel="blocks kept (--backbone-blocks)")
        ax.set_ylabel("MAP@R (leave-one-out)")
        ax.set_xticks(depth)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"EfficientNet-Lite0, ImageNet weights, no training, {image_size} px")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from sklearn.decomposition import PCA

    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    embedder = resolve_model("efficientnet_lite0", image_size=args.image_size)
    curves: dict[str, dict] = {}
    for dataset in args.dataset:
        print(f"{dataset}:")
        seen, test = datasets(args, dataset)
        y = np.asarray(test.labels)
        unseen = feature_maps(embedder, test, per_block=True)
        for name in ("avg", "gem", "max"):
            print(f"pooling {name:4s}          {score(unseen[name], y)}")
        learned = feature_maps(embedder, seen, per_block=False)["avg"]
        for dims in args.whiten_dims:
            pca = PCA(n_components=dims, whiten=True).fit(learned)
            print(f"PCA whitening {dims:4d}-d  {score(pca.transform(unseen['avg']), y)}")
        curve = {"avg": [], "grid": [], "indexed": metrics(unseen["avg"], y)[1]}
        blocks = sorted((k for k in unseen if k.startswith("block")), key=lambda k: int(k[6:]))
        for name in blocks:
            flat, grid = unseen[name], unseen[f"grid {name}"]
            (r1, map_r), (g_r1, g_map_r) = metrics(flat, y), metrics(grid, y)
            curve["avg"].append(map_r)
            curve["grid"].append(g_map_r)
            print(
                f"{name:8s} {flat.shape[1]:4d}-d   R@1 {r1:.3f}  MAP@R {map_r:.3f}   "
                f"grid 3: {grid.shape[1]:4d}-d   R@1 {g_r1:.3f}  MAP@R {g_map_r:.3f}"
            )
        curves[dataset] = curve
    if args.plot:
        plot(args.plot, curves, args.image_size)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
