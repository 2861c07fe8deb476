"""Benchmark the gallery index and the search server.

1. Index types on clustered synthetic vectors (default 1M x 128) and on real embeddings
   (Fashion-MNIST embedded by a checkpoint): build time, size, queries per second and
   recall@10 against exact search, over a sweep of each type's search parameter; exact search
   against a bare torch matmul + topk in the same run.
2. The HTTP server (``retrieval serve`` in a subprocess, loopback only) on a 100k gallery:
   p50 / p99 latency and throughput of ``POST /search`` with 8 concurrent clients and a
   bounded number of requests.

Queries are searched as one batch (throughput); all CPU threads are used by FAISS and torch.

Usage::

    python scripts/bench_search.py --model runs/train/best.pt --out bench.json
    python scripts/bench_search.py --n 100000 --skip-server      # a quick run
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch

from data.datasets import load_builtin
from retrieval.index.factory import nlist_for
from retrieval.index.gallery import GalleryIndex
from retrieval.index.manifest import INDEX_FILE
from retrieval.model.checkpoint import file_sha256, load_model, preprocessing
from retrieval.model.embed import embed_dataset

logger = logging.getLogger("bench_search")

#: Neighbours compared with exact search (recall@K).
K = 10
#: Search parameter sweeps per index family.
EF_SEARCH = (16, 32, 64, 128, 256)
NPROBE = (1, 2, 4, 8, 16, 32, 64, 128)
#: A timed search is repeated until it has run this long, seconds.
MIN_TIME = 1.0
#: The target: an approximate index at this recall with this speed-up.
TARGET_RECALL, TARGET_SPEEDUP = 0.95, 20.0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="synthetic gallery size")
    p.add_argument("--dim", type=int, default=128, help="synthetic dimension")
    p.add_argument("--clusters", type=int, default=1000, help="synthetic clusters")
    p.add_argument("--nq", type=int, default=1000, help="queries")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, help="checkpoint for real embeddings and the server")
    p.add_argument("--data-root", help="folder of Fashion-MNIST (default: the usual places)")
    p.add_argument("--server-n", type=int, default=100_000, help="server gallery size")
    p.add_argument("--server-index", default="auto", help="server index type")
    p.add_argument("--clients", type=int, default=8, help="concurrent server clients")
    p.add_argument("--requests", type=int, default=800, help="server requests in total")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--skip-server", action="store_true")
    p.add_argument("--out", type=Path, help="write all figures as JSON here")
    return p


# ------------------------------------------------------------------------------ helpers


def timed(fn: Callable[[], object], min_time: float = MIN_TIME) -> float:
    """Seconds per call of ``fn``, repeated until ``min_time`` has passed (after one warm-up)."""
    fn()
    runs, t0 = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time:
            return elapsed / runs


def recall(i_approx: np.ndarray, i_exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k."""
    return float(
        np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(i_approx, i_exact, strict=True)])
    )


def synthetic(n: int, dim: int, clusters: int, nq: int, seed: int):
    """Gaussian clusters of uneven size; queries drawn from the same mixture (not in the base)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    weights = rng.dirichlet(np.ones(clusters))
    spread = 0.6  # within-cluster std (centres have std 1 per coordinate)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), np.float32)
        for s in range(0, m, 100_000):
            e = min(m, s + 100_000)
            c = rng.choice(clusters, size=e - s, p=weights)
            out[s:e] = centres[c] + spread * rng.standard_normal((e - s, dim), dtype=np.float32)
        return out

    return draw(n), draw(nq)


def index_bytes(index: faiss.Index) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, INDEX_FILE)
        faiss.write_index(index, path)
        return os.path.getsize(path)


# ------------------------------------------------------------------------------ index types


def bench_vectors(name: str, xb: np.ndarray, xq: np.ndarray) -> dict:
    """Exact vs torch, then HNSW32, IVF-Flat and IVF-PQ sweeps, on one set of vectors."""
    n, dim = xb.shape
    refs = [""] * n
    labels = np.zeros(n, np.int64)
    logger.info("%s: %d x %d, %d queries", name, n, dim, len(xq))
    rows = []

    t0 = time.perf_counter()
    flat = GalleryIndex.build(xb, refs, labels, ["x"], index_type="Flat")
    build = time.perf_counter() - t0
    _, i_exact = flat.search(xq, K)
    t_exact = timed(lambda: flat.search(xq, K))
    exact_qps = len(xq) / t_exact
    rows.append(
        {
            "index": "Flat (exact)",
            "param": "",
            "build_s": round(build, 1),
            "mb": round(index_bytes(flat.index) / 1e6, 1),
            "qps": round(exact_qps),
            "recall@10": 1.0,
            "speedup": 1.0,
        }
    )

    xb_t = torch.from_numpy(np.ascontiguousarray(xb / np.linalg.norm(xb, axis=1, keepdims=True)))
    xq_t = torch.from_numpy(np.ascontiguousarray(xq / np.linalg.norm(xq, axis=1, keepdims=True)))

    def torch_topk() -> torch.Tensor:
        out = []
        for s in range(0, len(xq_t), 256):
            out.append(torch.topk(xq_t[s : s + 256] @ xb_t.T, K, dim=1).indices)
        return torch.cat(out)

    with torch.no_grad():
        i_torch = torch_topk().numpy()
        torch_qps = len(xq) / timed(torch_topk)
    xb_t = None  # free it before the next indexes
    baseline = {
        "torch_qps": round(torch_qps),
        "faiss_exact_qps": round(exact_qps),
        "ratio": round(exact_qps / torch_qps, 2),
        "torch_recall@10": round(recall(i_torch, i_exact), 4),
    }
    logger.info(
        "exact: faiss %.0f QPS, torch matmul+topk %.0f QPS (ratio %.2f)",
        exact_qps,
        torch_qps,
        exact_qps / torch_qps,
    )
    flat = None

    nlist = nlist_for(n)
    pq_m = next(m for m in (32, 16, 8, 4) if dim % m == 0)
    for spec, param, values in (
        ("HNSW32", "ef_search", EF_SEARCH),
        (f"IVF{nlist},Flat", "nprobe", NPROBE),
        (f"IVF{nlist},PQ{pq_m}", "nprobe", NPROBE),
    ):
        t0 = time.perf_counter()
        index = GalleryIndex.build(xb, refs, labels, ["x"], index_type=spec)
        build = time.perf_counter() - t0
        size = index_bytes(index.index)
        logger.info("%s built in %.1f s, %.1f MB", spec, build, size / 1e6)
        for v in values:
            if param == "nprobe" and v > nlist:
                continue
            kwargs = {param: v}
            _, i = index.search(xq, K, **kwargs)
            qps = len(xq) / timed(lambda ix=index, kw=kwargs: ix.search(xq, K, **kw))
            r = recall(i, i_exact)
            rows.append(
                {
                    "index": spec,
                    "param": f"{param}={v}",
                    "build_s": round(build, 1),
                    "mb": round(size / 1e6, 1),
                    "qps": round(qps),
                    "recall@10": round(r, 4),
                    "speedup": round(qps / exact_qps, 1),
                }
            )
            logger.info(
                "  %-12s recall@10 %.4f  %8.0f QPS  %5.1fx exact",
                f"{param}={v}",
                r,
                qps,
                qps / exact_qps,
            )
        index = None
    good = [r for r in rows[1:] if r["recall@10"] >= TARGET_RECALL]
    best = max(good, key=lambda r: r["qps"], default=None)
    return {
        "name": name,
        "n": n,
        "dim": dim,
        "nq": len(xq),
        "rows": rows,
        "exact_vs_torch": baseline,
        "best_at_target_recall": best,
    }


def real_embeddings(model_path: Path, data_root: str | None, nq: int, seed: int):
    """Fashion-MNIST train + test embedded by the checkpoint; ``nq`` test images are queries."""
    model, state = load_model(model_path)
    transform = preprocessing(state)
    parts, refs, labels = [], [], []
    for split in ("train", "test"):
        ds = load_builtin(split, data_root)
        parts.append(embed_dataset(model, ds.with_transform(transform), batch_size=512))
        refs += ds.refs
        labels.append(ds.labels)
    x = np.concatenate(parts)
    rng = np.random.default_rng(seed)
    n_train = len(parts[0])
    q = n_train + rng.choice(len(parts[1]), size=nq, replace=False)
    keep = np.setdiff1d(np.arange(len(x)), q)
    return x[keep], x[q], [refs[i] for i in keep], np.concatenate(labels)[keep], q


# ------------------------------------------------------------------------------ server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_server(
    model_path: Path,
    data_root: str | None,
    n: int,
    index_type: str,
    clients: int,
    requests: int,
    seed: int,
) -> dict:
    """Serve an n-image gallery with ``retrieval serve`` and hammer ``POST /search``."""
    import httpx
    from PIL import Image

    model, state = load_model(model_path)
    transform = preprocessing(state)
    test = load_builtin("test", data_root)
    train = load_builtin("train", data_root)
    base = embed_dataset(model, train.with_transform(transform), batch_size=512)
    rng = np.random.default_rng(seed)
    extra = max(0, n - len(base))  # beyond the real set: jittered copies (same refs)
    pick = rng.choice(len(base), size=extra)
    xb = np.concatenate(
        [base, base[pick] + 0.01 * rng.standard_normal((extra, base.shape[1]), dtype=np.float32)]
    )[:n]
    refs = (train.refs + [train.refs[i] for i in pick])[:n]
    labels = np.concatenate([train.labels, train.labels[pick]])[:n]
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp) / "index"
        t0 = time.perf_counter()
        index = GalleryIndex.build(
            xb,
            refs,
            labels,
            train.class_names,
            index_type=index_type,
            model_sha256=file_sha256(model_path),
            model_path=str(model_path.resolve()),
            preprocessing={k: state["model_config"][k] for k in ("image_size", "mean", "std")},
        )
        index.save(index_dir)
        build = time.perf_counter() - t0
        chosen = index.manifest.index_type
        del index
        port = _free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "retrieval",
                "serve",
                str(index_dir),
                "--model",
                str(model_path),
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("server did not start: " + server.stderr.read().decode())
                time.sleep(0.2)
            pngs = []
            for i in rng.choice(len(test), size=64, replace=False):
                buf = io.BytesIO()
                Image.fromarray(test.image(int(i)).permute(1, 2, 0).numpy()).save(buf, "PNG")
                pngs.append(buf.getvalue())
            latencies: list[float] = []
            failures: list[str] = []
            lock = threading.Lock()

            def client(c: int, count: int) -> None:
                with httpx.Client(base_url=url, timeout=30) as http:
                    for j in range(count):
                        data = pngs[(c * 7 + j) % len(pngs)]
                        t = time.perf_counter()
                        r = http.post(
                            "/search",
                            files={"file": ("q.png", data, "image/png")},
                            data={"k": str(K)},
                        )
                        dt = time.perf_counter() - t
                        with lock:
                            if r.status_code == 200:
                                latencies.append(dt)
                            else:
                                failures.append(r.text[:200])

            client(0, 2 * clients)  # warm-up
            latencies.clear()
            per_client = requests // clients
            threads = [
                threading.Thread(target=client, args=(c, per_client)) for c in range(clients)
            ]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
        finally:
            server.terminate()
            server.wait(timeout=30)
    lat = np.array(latencies) * 1000
    out = {
        "n": n,
        "index_type": chosen,
        "build_s": round(build, 1),
        "clients": clients,
        "requests": len(lat),
        "failures": len(failures),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "throughput_rps": round(len(lat) / wall, 1),
    }
    logger.info("server: %s", out)
    return out


# ------------------------------------------------------------------------------ main


def _table(result: dict) -> str:
    lines = [
        f"### {result['name']}: {result['n']:,} x {result['dim']}, {result['nq']} queries",
        "",
        "| index | search parameter | build (s) | size (MB) | QPS | recall@10 | x exact |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['index']} | {r['param']} | {r['build_s']} | {r['mb']} | {r['qps']:,} "
            f"| {r['recall@10']:.4f} | {r['speedup']} |"
        )
    b = result["exact_vs_torch"]
    lines += [
        "",
        f"Exact search: FAISS {b['faiss_exact_qps']:,} QPS vs torch matmul+topk "
        f"{b['torch_qps']:,} QPS (ratio {b['ratio']}; target >= 0.8).",
    ]
    best = result["best_at_target_recall"]
    if best:
        ok = "meets" if best["speedup"] >= TARGET_SPEEDUP else "misses"
        lines.append(
            f"Fastest at recall@10 >= {TARGET_RECALL}: {best['index']} {best['param']}, "
            f"{best['qps']:,} QPS = {best['speedup']}x exact ({ok} the "
            f"{TARGET_SPEEDUP:g}x target)."
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("retrieval").setLevel(logging.WARNING)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    report: dict = {
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "faiss": faiss.__version__,
        "torch": torch.__version__,
        "runs": [],
    }
    if not args.skip_synthetic:
        xb, xq = synthetic(args.n, args.dim, args.clusters, args.nq, args.seed)
        report["runs"].append(bench_vectors("synthetic clustered", xb, xq))
        del xb, xq
    if args.model is None and not (args.skip_real and args.skip_server):
        logger.warning("no --model: skipping real embeddings and the server")
        args.skip_real = args.skip_server = True
    if not args.skip_real:
        xb, xq, _, _, _ = real_embeddings(args.model, args.data_root, args.nq, args.seed)
        report["runs"].append(bench_vectors("Fashion-MNIST embeddings", xb, xq))
    if not args.skip_server:
        report["server"] = bench_server(
            args.model,
            args.data_root,
            args.server_n,
            args.server_index,
            args.clients,
            args.requests,
            args.seed,
        )
    for run in report["runs"]:
        print(_table(run) + "\n")
    if "server" in report:
        s = report["server"]
        print(
            f"Server ({s['index_type']}, {s['n']:,} images, {s['clients']} clients, "
            f"{s['requests']} requests, {s['failures']} failures): p50 {s['p50_ms']} ms, "
            f"p99 {s['p99_ms']} ms, {s['throughput_rps']} requests/s"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
