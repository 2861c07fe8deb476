"""Benchmark embedding a folder of photos: the library's path against a bare loop.

1. Makes a folder of photo-like JPEGs (smooth random colour fields with shapes and noise,
   default 200 images of 800 x 600) in a temporary folder.
2. **Library**: what ``retrieval embed FOLDER --model MODEL`` does — resolve the model, open the
   folder, decode and preprocess in DataLoader workers, batched inference
   (:func:`retrieval.model.embed.embed_dataset`). Timed without and with opening the folder
   (listing it and checking every file decodes).
3. **Bare loop**: the same network forward on the same batches, pre-decoded into memory
   beforehand (untimed): the speed the library could reach if decoding cost nothing.
   Run in the library's memory layout, and also in torch's default layout (what
   channels-last gains).

Runs alternate (bare, library, bare, library, ...) so that a busy machine slows both alike;
the best run of each counts, and each library run is also compared with the bare run just
before it. Target: the library at >= 0.9x the bare loop's images/s.
The library's vectors are checked against the bare loop's.

Usage::

    python scripts/bench_embed.py                                 # 200 images, lite0, 224 px
    python scripts/bench_embed.py --images 40 --model resnet18:W.pth --workers 0
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from data.datasets import open_source
from retrieval.model.embed import default_batch_size, default_num_workers, embed_dataset
from retrieval.model.resolve import resolve_model

logger = logging.getLogger("bench_embed")

#: The target: library images/s over bare-loop images/s.
TARGET_RATIO = 0.9
#: Largest difference allowed between the library's and the bare loop's vectors.
TOLERANCE = 1e-4


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200, help="photos to generate")
    p.add_argument("--width", type=int, default=800, help="photo width, pixels")
    p.add_argument("--height", type=int, default=600, help="photo height, pixels")
    p.add_argument("--model", default="efficientnet_lite0", help="model spec (resolve_model)")
    p.add_argument("--image-size", type=int, default=None, help="override the model's size")
    p.add_argument("--batch-size", type=int, default=None, help="default: the library's")
    p.add_argument("--workers", type=int, default=None, help="default: the library's choice")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random colour field with filled shapes and lines, slightly blurred, with
    sensor-like noise: it decodes and resizes like a photo."""
    coarse = rng.integers(0, 256, size=(rng.integers(2, 5), rng.integers(2, 5), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    for _ in range(rng.integers(6, 12)):
        x0, y0 = rng.uniform(-0.1, 1.0) * width, rng.uniform(-0.1, 1.0) * height
        box = [x0, y0, x0 + rng.uniform(0.05, 0.4) * side, y0 + rng.uniform(0.05, 0.4) * side]
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        shape = (draw.ellipse, draw.rectangle)[int(rng.integers(0, 2))]
        shape(box, fill=colour)
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(side / 300)), dtype=np.float32)
    pixels = pixels + rng.normal(0, 4, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_photos(folder: Path, n: int, width: int, height: int, seed: int = 0) -> list[Path]:
    """``n`` photo-like JPEGs (:func:`photo_like`, quality 90) in ``folder/photos/``."""
    rng = np.random.default_rng(seed)
    out = folder / "photos"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = out / f"photo_{i:04d}.jpg"
        photo_like(rng, width, height).save(path, quality=90)
        paths.append(path)
    return paths


def bare_loop(model: torch.nn.Module, batches: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    """Seconds for the forward passes over pre-decoded ``batches``, and the vectors."""
    out = []
    start = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            out.append(model(x))
    return time.perf_counter() - start, torch.cat(out)


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench_embed-") as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        make_photos(folder, args.images, args.width, args.height)
        logger.info("made %d photos in %.1f s", args.images, time.perf_counter() - t)
        embedder = resolve_model(args.model, args.image_size)
        model, size = embedder.model, embedder.image_size

        def open_folder():
            return open_source(str(folder), draft_size=size).with_transform(embedder.transform())

        dataset = open_folder()
        batch = args.batch_size or default_batch_size(size)
        workers = default_num_workers(dataset) if args.workers is None else args.workers
        decoded = torch.stack([dataset[i][0] for i in range(len(dataset))])  # untimed
        batches = list(decoded.split(batch))
        batches_cl = [b.contiguous(memory_format=torch.channels_last) for b in batches]
        for layout, warm in ((torch.contiguous_format, batches), (torch.channels_last, batches_cl)):
            model.to(memory_format=layout)  # first passes set up oneDNN's kernels: untimed
            bare_loop(model, [warm[0], warm[-1]])
        times: dict[str, list[float]] = {"bare": [], "bare_nchw": [], "library": [], "open": []}
        for _ in range(args.repeats):
            model.to(memory_format=torch.contiguous_format)
            seconds, plain = bare_loop(model, batches)
            times["bare_nchw"].append(seconds)
            model.to(memory_format=torch.channels_last)
            seconds, reference = bare_loop(model, batches_cl)
            times["bare"].append(seconds)
            model.to(memory_format=torch.contiguous_format)
            start = time.perf_counter()
            dataset = open_folder()
            opened = time.perf_counter()
            vectors = embed_dataset(model, dataset, batch_size=batch, num_workers=workers)
            times["open"].append(opened - start)
            times["library"].append(time.perf_counter() - opened)
        n = len(dataset)
        best = {k: min(v) for k, v in times.items()}
        diff = float(np.abs(vectors - reference.numpy()).max())
        layout_diff = float((plain - reference).abs().max())
        result = {
            "images": n,
            "photo_size": [args.width, args.height],
            "model": embedder.name,
            "image_size": size,
            "batch_size": batch,
            "workers": workers,
            "threads": torch.get_num_threads(),
            "bare_images_per_s": n / best["bare"],
            "bare_nchw_images_per_s": n / best["bare_nchw"],
            "library_images_per_s": n / best["library"],
            "library_with_open_images_per_s": n / (best["library"] + best["open"]),
            "ratio": best["bare"] / best["library"],
            "ratio_with_open": best["bare"] / (best["library"] + best["open"]),
            # each library run against the bare run just before it (a busy machine's load varies)
            "pair_ratios": [
                b / lib for b, lib in zip(times["bare"], times["library"], strict=True)
            ],
            "channels_last_speedup": best["bare_nchw"] / best["bare"],
            "max_difference": diff,
            "layout_max_difference": layout_diff,
            "runs_seconds": times,
        }
    print(
        f"{n} photos {args.width}x{args.height}, {embedder.name} at {size} px, batches of "
        f"{batch}, {workers} worker(s), {torch.get_num_threads()} threads\n"
        f"bare loop (pre-decoded, channels-last): {result['bare_images_per_s']:8.1f} images/s\n"
        f"bare loop (pre-decoded, default layout):{result['bare_nchw_images_per_s']:8.1f} "
        f"images/s (channels-last x{result['channels_last_speedup']:.2f})\n"
        f"library embed_dataset:                  {result['library_images_per_s']:8.1f} images/s"
        f"  ratio {result['ratio']:.3f} (target >= {TARGET_RATIO})\n"
        f"library incl. opening the folder:       "
        f"{result['library_with_open_images_per_s']:8.1f} images/s  ratio "
        f"{result['ratio_with_open']:.3f}\n"
        f"ratio of each library run to the bare run before it: "
        f"{', '.join(f'{r:.2f}' for r in result['pair_ratios'])} "
        f"(median {float(np.median(result['pair_ratios'])):.2f})\n"
        f"largest difference library vs bare: {diff:.1e}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if diff > TOLERANCE:
        raise SystemExit(f"the library's vectors differ from the bare loop's by {diff:.2e}")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    main(get_args_parser().parse_args())
