"""Benchmark: ``retrieval.evaluation.evaluate.evaluate`` against PML's AccuracyCalculator.

Both evaluate the same synthetic embeddings (Gaussian classes, leave-one-out, L2) and must give
the same precision@1, R-precision, MAP@R, NMI and AMI. Each side runs in its own subprocess so
that its peak resident memory (``ru_maxrss``, which includes the ~0.4 GB of imported libraries)
is its own; the time is that of the evaluation call alone.

    .venv/bin/python scripts/bench_eval.py                  # 100k x 128, 100 classes
    .venv/bin/python scripts/bench_eval.py --n 20000 --classes 200

PML runs with ``k="max_bin_count"``, the setting its documentation gives for MAP@R (its
default, ``k=None``, would rank every item against all the others: an n x n matrix).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

#: Metric names: AccuracyCalculator's -> ours.
PAIRS = {
    "precision_at_1": "recall@1",
    "r_precision": "r_precision",
    "mean_average_precision_at_r": "map@r",
    "NMI": "nmi",
    "AMI": "ami",
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="embeddings")
    p.add_argument("--dim", type=int, default=128, help="embedding length")
    p.add_argument(
        "--classes",
        type=int,
        default=100,
        help="classes (balanced on average; 100 gives R ~ 1000, like Fashion-MNIST)",
    )
    p.add_argument("--noise", type=float, default=1.5, help="within-class spread")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["ours", "pml"], help=argparse.SUPPRESS)  # child process
    return p


def make_data(args) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(args.seed)
    y = rng.integers(0, args.classes, size=args.n)
    centres = rng.normal(size=(args.classes, args.dim)).astype(np.float32)
    x = centres[y] + args.noise * rng.normal(size=(args.n, args.dim)).astype(np.float32)
    return x.astype(np.float32), y


def run_ours(x, y) -> dict:
    from retrieval.evaluation.evaluate import evaluate

    t0 = time.perf_counter()
    ev = evaluate(x, y, ks=(1,), metric="l2", clustering=True)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "metrics": {k: ev.metrics[v] for k, v in PAIRS.items()}}


def run_pml(x, y) -> dict:
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=tuple(PAIRS), k="max_bin_count", device=torch.device("cpu"))
    t0 = time.perf_counter()
    got = calc.get_accuracy(x, y)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "metrics": {k: float(v) for k, v in got.items()}}


def child(args) -> None:
    from retrieval.index.knn import blas_blocks

    x, y = make_data(args)
    with blas_blocks():  # both sides search with the project's FAISS BLAS block sizes
        result = (run_ours if args.only == "ours" else run_pml)(x, y)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sys.stdout.write(json.dumps(result) + "\n")


def main(args) -> None:
    if args.only:
        child(args)
        return
    base = [
        sys.executable,
        __file__,
        "--n",
        str(args.n),
        "--dim",
        str(args.dim),
        "--classes",
        str(args.classes),
        "--noise",
        str(args.noise),
        "--seed",
        str(args.seed),
    ]
    results = {}
    for side in ("ours", "pml"):
        print(f"running {side} ...", file=sys.stderr, flush=True)
        done = subprocess.run([*base, "--only", side], capture_output=True, text=True, check=True)
        results[side] = json.loads(done.stdout.strip().splitlines()[-1])
    ours, pml = results["ours"], results["pml"]
    print(f"{args.n} x {args.dim} embeddings, {args.classes} classes, leave-one-out, L2")
    print(f"{'metric':<30}{'ours':>12}{'PML':>12}{'|diff|':>12}")
    worst = 0.0
    for name in PAIRS:
        a, b = ours["metrics"][name], pml["metrics"][name]
        worst = max(worst, abs(a - b))
        print(f"{name:<30}{a:>12.6f}{b:>12.6f}{abs(a - b):>12.2e}")
    print(f"{'seconds':<30}{ours['seconds']:>12.1f}{pml['seconds']:>12.1f}")
    print(f"{'peak RSS (MB)':<30}{ours['peak_rss_mb']:>12.0f}{pml['peak_rss_mb']:>12.0f}")
    print(
        f"speed-up {pml['seconds'] / ours['seconds']:.2f}x, "
        f"memory ratio {pml['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x, "
        f"largest metric difference {worst:.2e}"
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
