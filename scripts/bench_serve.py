"""Benchmark the search server against the engine's own limit, in one run on one gallery.

(a) in process: decode + preprocess + embed + search of the query images, ``--max-batch`` at a
    time, one call after another (no HTTP): the most this machine can do with this model;
(b) the server (a subprocess on 127.0.0.1) with micro-batching (``max_batch=--max-batch``);
(c) the same server with ``max_batch=1`` (each request alone).

For (b) and (c): p50 / p99 latency and throughput of ``POST /search`` (k=10) for each number of
concurrent clients (``--clients``), and how long the server took to answer ``/health`` at all
and to answer it ``ok`` (loaded and warmed up). The clients are keep-alive connections of
this process, each sending its next request (encoded beforehand) as soon as its last one is
answered, all driven by one thread with ``selectors``: light (about 0.1 ms of CPU per request,
a third of what a thread per client with ``http.client`` took), but they share the CPU with
the server; (b) and (c) use the same clients. Each row also gives where the CPU went: the
mean batch a request was served in (from its ``Server-Timing``), and the CPU time per request
of the server process and of the clients (this process), in ms (``/proc``; Linux only). On a
machine shared with other work the throughputs follow the share of the cores the run got;
the CPU per request does not, and (b) against (c) in the same run stays comparable.

The gallery is ``--n`` random unit vectors (the FAISS side does not care what they came from),
indexed with ``--index`` (default ``auto``: HNSW32 at 100,000); the model is ``--model`` or a
freshly initialised small CNN (28 px, 128-d) saved as a checkpoint; the queries are
Fashion-MNIST test images as PNG when ``--data-root`` (or the usual places) has them, else
random 28 px images.

Usage::

    PYTHONPATH=. python scripts/bench_serve.py --out bench-serve.json               # 100k gallery
    PYTHONPATH=. python scripts/bench_serve.py --n 2000 --clients 1,4 --requests 40  # a quick run
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import logging
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

logger = logging.getLogger("bench_serve")

#: Neighbours per search.
K = 10
#: The targets at 8 clients: (b) / (c) throughput, (b) p99, (b) / (a) throughput.
TARGET_BATCHING_GAIN, TARGET_P99_MS, TARGET_OF_ENGINE = 3.0, 30.0, 0.5
#: The server is started by this code in a subprocess (the same function ``retrieval serve``
#: calls).
SERVER_CODE = (
    "import sys, logging; logging.basicConfig(level=logging.WARNING); "
    "from retrieval.serving.server import serve; "
    "serve(sys.argv[1], port=int(sys.argv[2]), max_batch=int(sys.argv[3]), "
    "max_wait_ms=float(sys.argv[4]))"
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="gallery size (random vectors)")
    p.add_argument("--index", default="auto", help="index type")
    p.add_argument("--model", type=Path, help="checkpoint (default: a fresh small CNN)")
    p.add_argument("--data-root", help="folder of Fashion-MNIST (queries)")
    p.add_argument("--queries", type=int, default=64, help="distinct query images")
    p.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    p.add_argument("--requests", type=int, default=400, help="requests per client count")
    p.add_argument("--max-batch", type=int, default=32, help="server (b) and in-process batch")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="server (b) batching window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    return p


# ------------------------------------------------------------------------------ set-up


def make_checkpoint(path: Path, seed: int) -> Path:
    """A small CNN (28 px, 128-d) with random weights and batch-norm statistics, saved as a
    checkpoint of ours (no training: speed does not depend on the weights)."""
    import torch
    from torch import nn

    from retrieval.model.checkpoint import save_checkpoint
    from retrieval.model.networks import build_model

    torch.manual_seed(seed)
    model = build_model("small", 128, "head", image_size=28)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    config = {
        "arch": "small",
        "head_dim": 128,
        "embedding": "head",
        "embedding_dim": model.output_dim,
        "image_size": 28,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }
    save_checkpoint(path, model, config)
    return path


def build_gallery(model_path: Path, out: Path, n: int, index_type: str, seed: int) -> str:
    """An index folder of ``n`` random unit vectors made for ``model_path``; its type."""
    from retrieval.index.gallery import GalleryIndex
    from retrieval.model.checkpoint import file_sha256, load_checkpoint

    cfg = load_checkpoint(model_path)["model_config"]
    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((n, cfg["embedding_dim"]), dtype=np.float32)
    index = GalleryIndex.build(
        xb,
        [f"/gallery/{i:07d}.png" for i in range(n)],
        rng.integers(0, 10, n),
        [f"class{c}" for c in range(10)],
        index_type=index_type,
        model_sha256=file_sha256(model_path),
        model_path=str(model_path.resolve()),
        preprocessing={key: cfg[key] for key in ("image_size", "mean", "std")},
    )
    index.save(out)
    return index.manifest.index_type


def query_pngs(count: int, data_root: str | None, seed: int) -> list[bytes]:
    """``count`` PNG files: Fashion-MNIST test images if found, else random 28 px images."""
    from PIL import Image

    from data.errors import DataError

    rng = np.random.default_rng(seed)
    try:
        from data.datasets import load_builtin

        test = load_builtin("test", data_root)
        arrays = [
            test.image(int(i)).permute(1, 2, 0).numpy()
            for i in rng.choice(len(test), count, replace=False)
        ]
    except (DataError, OSError):
        logger.info("Fashion-MNIST not found: random query images")
        arrays = [rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for _ in range(count)]
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


# ------------------------------------------------------------------------------ (a)


def bench_in_process(index_dir: Path, pngs: list[bytes], batch: int, total: int) -> dict:
    """Decode, preprocess, embed and search ``total`` queries, ``batch`` per call."""
    from retrieval.serving.service import Query, SearchService, configure_threads, decode_image

    configure_threads(batched=True)
    service = SearchService(index_dir, device="cpu")
    service.warm_up([1, batch])

    def run(start: int) -> None:
        queries = []
        for j in range(start, start + batch):
            image, _ = decode_image(pngs[j % len(pngs)], draft_size=service.image_size)
            queries.append(Query(service.prepare(image), K))
        for answer in service.search_batch(queries):
            if isinstance(answer, BaseException):
                raise answer

    run(0)
    calls = max(1, total // batch)
    t0 = time.perf_counter()
    for c in range(calls):
        run(c * batch)
    wall = time.perf_counter() - t0
    return {
        "batch": batch,
        "queries": calls * batch,
        "ms_per_batch": round(1000 * wall / calls, 2),
        "throughput_qps": round(calls * batch / wall, 1),
    }


# ------------------------------------------------------------------------------ (b), (c)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _multipart(png: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="q.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode() + png
    body += (
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{K}\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _health(port: int) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/health")
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return None


def start_server(index_dir: Path, max_batch: int, max_wait_ms: float) -> tuple:
    """Start the server; ``(process, port, seconds to a first /health answer, to ok)``."""
    import retrieval

    port = _free_port()
    root = str(Path(retrieval.__file__).resolve().parents[1])  # this checkout's package
    env = os.environ | {"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_CODE, str(index_dir), str(port), str(max_batch)]
        + [str(max_wait_ms)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    first = None
    deadline = time.monotonic() + 120
    while True:
        status = _health(port)
        if status is not None and first is None:
            first = time.perf_counter() - t0
        if status == 200:
            return proc, port, first, time.perf_counter() - t0
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start: " + proc.stderr.read().decode()[-2000:])
        time.sleep(0.02)


def _request(port: int, png: bytes) -> bytes:
    """A whole ``POST /search`` request (HTTP/1.1, keep-alive), encoded once."""
    body, ctype = _multipart(png)
    head = (
        f"POST /search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Client:
    """One keep-alive connection that sends its next request when the last one is answered."""

    def __init__(self, port: int, index: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.index, self.sent, self.buf, self.t = index, 0, bytearray(), 0.0

    def send(self, request: bytes) -> None:
        self.sent += 1
        self.t = time.perf_counter()
        self.sock.sendall(request)

    def response(self) -> tuple[int, dict[str, str], bytes] | None:
        """The response in the buffer once it is complete: status, headers, body."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" not in headers:  # the server answers every search with a length
            raise RuntimeError(f"a response without Content-Length: {lines[0]!r}")
        length = int(headers["content-length"])
        if len(self.buf) < end + 4 + length:
            return None
        body = bytes(self.buf[end + 4 : end + 4 + length])
        del self.buf[: end + 4 + length]
        return int(lines[0].split(" ", 2)[1]), headers, body


def load(port: int, pngs: list[bytes], clients: int, requests: int) -> dict:
    """``requests`` searches spread over ``clients`` keep-alive connections, each sending its
    next request as soon as its last one is answered.

    One thread drives every connection (``selectors``) with requests encoded beforehand: the
    clients cost the machine a small fraction of what the server does, and no two client
    threads fight over this process's GIL.
    """
    encoded = [_request(port, p) for p in pngs]
    per_client = max(1, requests // clients)
    latencies: list[float] = []
    failures: list[str] = []
    batch_sizes: list[int] = []
    conns = [_Client(port, c) for c in range(clients)]
    with selectors.DefaultSelector() as sel:
        for conn in conns:
            sel.register(conn.sock, selectors.EVENT_READ, conn)
        t0 = time.perf_counter()
        for conn in conns:
            conn.send(encoded[(conn.index * 7) % len(encoded)])
        open_conns = len(conns)
        while open_conns:
            ready = sel.select(timeout=60)
            if not ready:
                raise RuntimeError("the server answered nothing for 60 s")
            for key, _ in ready:
                conn = key.data
                chunk = conn.sock.recv(1 << 16)
                if not chunk:
                    failures.append("the server closed the connection")
                    sel.unregister(conn.sock)
                    open_conns -= 1
                    continue
                conn.buf += chunk
                answer = conn.response()
                if answer is None:
                    continue
                dt = time.perf_counter() - conn.t
                status, headers, body = answer
                if status == 200:
                    latencies.append(dt)
                    timing = headers.get("server-timing", "")
                    batch = timing.rpartition('batch;desc="')[2].partition('"')[0]
                    batch_sizes.append(int(batch) if batch.isdigit() else 0)
                else:
                    failures.append(body[:200].decode(errors="replace"))
                if conn.sent < per_client:
                    conn.send(encoded[(conn.index * 7 + conn.sent) % len(encoded)])
                else:
                    sel.unregister(conn.sock)
                    open_conns -= 1
        wall = time.perf_counter() - t0
    for conn in conns:
        conn.sock.close()
    lat = np.array(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(lat),
        "failures": len(failures),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        "throughput_rps": round(len(lat) / wall, 1),
        "mean_batch": round(float(np.mean(batch_sizes)), 2) if batch_sizes else None,
    }


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) a process has used so far; ``None`` without ``/proc``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def measured_load(pid: int, port: int, pngs: list[bytes], clients: int, requests: int) -> dict:
    """:func:`load`, and the CPU time per request of the server process and of the clients
    (this process), in ms: where the machine's time went."""
    server0, client0 = process_cpu_s(pid), time.process_time()
    row = load(port, pngs, clients, requests)
    server1, client1 = process_cpu_s(pid), time.process_time()
    n = max(1, row["requests"])
    row["server_cpu_ms"] = (
        round(1000 * (server1 - server0) / n, 2) if None not in (server0, server1) else None
    )
    row["client_cpu_ms"] = round(1000 * (client1 - client0) / n, 2)
    return row


def bench_server(
    index_dir: Path,
    pngs: list[bytes],
    max_batch: int,
    max_wait_ms: float,
    clients: list[int],
    requests: int,
) -> dict:
    proc, port, first, ready = start_server(index_dir, max_batch, max_wait_ms)
    try:
        load(port, pngs, 2, 20)  # warm-up: connections, thread pool
        rows = [measured_load(proc.pid, port, pngs, c, requests) for c in clients]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = {
        "max_batch": max_batch,
        "first_health_s": round(first, 2),
        "ready_s": round(ready, 2),
        "rows": rows,
    }
    logger.info("server max_batch=%d: %s", max_batch, out)
    return out


# ------------------------------------------------------------------------------ main


def _table(report: dict) -> str:
    a, b, c = report["in_process"], report["batched"], report["unbatched"]
    lines = [
        f"Gallery: {report['n']:,} random {report['dim']}-d vectors, {report['index_type']}; "
        f"{report['cpus']} CPUs, load average before the run {report['load_average'][0]:.1f}.",
        "",
        f"(a) in process, batches of {a['batch']}: {a['throughput_qps']:,} queries/s "
        f"({a['ms_per_batch']} ms per batch).",
        "",
        "| clients | (b) batched p50 / p99 ms | (b) req/s | (c) max-batch 1 p50 / p99 ms "
        "| (c) req/s | (b)/(c) | (b)/(a) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rb, rc in zip(b["rows"], c["rows"], strict=True):
        lines.append(
            f"| {rb['clients']} | {rb['p50_ms']} / {rb['p99_ms']} | {rb['throughput_rps']} "
            f"| {rc['p50_ms']} / {rc['p99_ms']} | {rc['throughput_rps']} "
            f"| {rb['throughput_rps'] / rc['throughput_rps']:.2f} "
            f"| {rb['throughput_rps'] / a['throughput_qps']:.2f} |"
        )
    lines += [
        "",
        "| clients | (b) mean batch | (b) CPU ms per request: server + clients "
        "| (c) CPU ms per request: server + clients |",
        "|---:|---:|---:|---:|",
    ]
    for rb, rc in zip(b["rows"], c["rows"], strict=True):
        lines.append(
            f"| {rb['clients']} | {rb['mean_batch']} | {rb['server_cpu_ms']} + "
            f"{rb['client_cpu_ms']} | {rc['server_cpu_ms']} + {rc['client_cpu_ms']} |"
        )
    lines += [
        "",
        f"Startup (first /health answer / ok): (b) {b['first_health_s']} / {b['ready_s']} s, "
        f"(c) {c['first_health_s']} / {c['ready_s']} s. Failures: "
        f"{sum(r['failures'] for r in b['rows'] + c['rows'])}.",
    ]
    return "\n".join(lines)


def targets(report: dict, clients: int = 8) -> dict | None:
    """The targets at ``clients`` clients, when that many were measured."""
    rows = {
        name: next((r for r in report[name]["rows"] if r["clients"] == clients), None)
        for name in ("batched", "unbatched")
    }
    b, c = rows["batched"], rows["unbatched"]
    if b is None or c is None:
        return None
    gain = b["throughput_rps"] / c["throughput_rps"]
    of_engine = b["throughput_rps"] / report["in_process"]["throughput_qps"]
    return {
        "clients": clients,
        "batched_over_unbatched": round(gain, 2),
        "batched_p99_ms": b["p99_ms"],
        "batched_over_in_process": round(of_engine, 2),
        "met": gain >= TARGET_BATCHING_GAIN
        and b["p99_ms"] <= TARGET_P99_MS
        and of_engine >= TARGET_OF_ENGINE,
    }


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("retrieval").setLevel(logging.WARNING)
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    report: dict = {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "n": args.n}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_checkpoint(Path(tmp) / "model.pt", args.seed)
        index_dir = Path(tmp) / "index"
        t0 = time.perf_counter()
        report["index_type"] = build_gallery(model, index_dir, args.n, args.index, args.seed)
        report["build_s"] = round(time.perf_counter() - t0, 1)
        from retrieval.model.checkpoint import load_checkpoint

        report["dim"] = load_checkpoint(model)["model_config"]["embedding_dim"]
        pngs = query_pngs(args.queries, args.data_root, args.seed)
        report["batched"] = bench_server(
            index_dir, pngs, args.max_batch, args.max_wait_ms, clients, args.requests
        )
        report["unbatched"] = bench_server(
            index_dir, pngs, 1, args.max_wait_ms, clients, args.requests
        )
        report["in_process"] = bench_in_process(index_dir, pngs, args.max_batch, args.requests)
    report["targets_at_8_clients"] = targets(report)
    print(_table(report))
    if report["targets_at_8_clients"] is not None:
        print(f"Targets at 8 clients: {report['targets_at_8_clients']}")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
