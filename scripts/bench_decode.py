"""Benchmark reading large photos for a 224 px model: full decode against draft + reduce.

Generates photo-like 4000 x 3000 images (JPEG and PNG) in a temporary folder, then times, in
the same run, the two routes to the model's input (``eval_transform(224)``):

- ``full``: ``read_image(path)`` decodes every pixel, the transform shrinks it;
- ``draft``: ``read_image(path, draft_size=224)`` decodes JPEGs at a reduced scale and
  box-reduces other formats first (:func:`data.images.decode_image`).

Reports milliseconds per image, the speed-up, and how much the model's input differs between
the routes (mean absolute difference in grey levels, 0-255). One thread (as in a DataLoader
worker).

Usage (from the repository's root, so that its packages are the ones imported)::

    PYTHONPATH=. python scripts/bench_decode.py                # 5 images per format
    PYTHONPATH=. python scripts/bench_decode.py --n 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.images import read_image
from data.transforms import eval_transform
from retrieval.atomic import write_json

logger = logging.getLogger("bench_decode")

#: The model's input size (the pretrained backbones' native size).
SIZE = 224
#: The photos' size, pixels (width, height): a 12-megapixel camera.
PHOTO = (4000, 3000)
#: The target: JPEG photos read for the model at least this many times faster than in full.
TARGET_JPEG_SPEEDUP = 3.0
#: Each route is timed this many times over all images; the best round counts.
ROUNDS = 3


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5, help="images per format")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p


def make_photo(seed: int) -> np.ndarray:
    """A smooth, textured ``(H, W, 3)`` uint8 image that compresses like a photo."""
    rng = np.random.default_rng(seed)
    w, h = PHOTO
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(20, 200), rng.uniform(20, 200), rng.uniform(0, 6)
        chans.append(127 + 90 * np.sin(x / fx + phase) * np.cos(y / fy))
    img = np.stack(chans, axis=-1) + rng.normal(0, 6, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def time_route(paths: list[Path], draft_size: int | None) -> tuple[float, list[torch.Tensor]]:
    """Best-of-ROUNDS milliseconds per image, and the model inputs of the last round."""
    transform = eval_transform(SIZE, (0.0,) * 3, (1 / 255,) * 3)  # grey levels
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        out = [transform(read_image(p, draft_size)) for p in paths]
        best = min(best, (time.perf_counter() - start) / len(paths) * 1000)
    return best, out


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    results: dict = {"size": SIZE, "photo": list(PHOTO), "n": args.n}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, suffix in (("JPEG", ".jpg"), ("PNG", ".png")):
            paths = []
            for i in range(args.n):
                path = Path(tmp, f"photo{i}{suffix}")
                Image.fromarray(make_photo(i)).save(path, quality=90)
                paths.append(path)
            full_ms, full = time_route(paths, None)
            draft_ms, draft = time_route(paths, SIZE)
            diff = float(
                torch.stack([(a - b).abs().mean() for a, b in zip(full, draft, strict=True)]).mean()
            )
            results[fmt] = {
                "full_ms": round(full_ms, 1),
                "draft_ms": round(draft_ms, 1),
                "speedup": round(full_ms / draft_ms, 2),
                "mean_abs_diff_grey_levels": round(diff, 2),
            }
            logger.info("%s: %s", fmt, results[fmt])
    ok = "meets" if results["JPEG"]["speedup"] >= TARGET_JPEG_SPEEDUP else "misses"
    logger.info(
        "JPEG speed-up %sx %s the %gx target", results["JPEG"]["speedup"], ok, TARGET_JPEG_SPEEDUP
    )
    print(json.dumps(results, indent=2))
    if args.json is not None:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
