"""Open time and memory of an index folder: the SQLite metadata store against ``metadata.json``.

Builds one gallery of random vectors (``--items``, ``--dim``; Flat) and writes it as an index
folder (timing ``save``) with this code (``metadata.sqlite``). When ``--old-code`` names a
checkout of a version that wrote ``metadata.json`` (format 2; e.g. the files of commit 4e41b88:
``git archive 4e41b88 | tar -x -C ../old``), that code writes one too. Each folder is then
opened ``--repeats`` times, each time in a fresh process of the code that wrote it, which
reports: seconds to open (``GalleryIndex.load``); the resident memory the open added, at its
peak (``ru_maxrss`` minus the peak after the imports) and held after it (resident pages from
``/proc/self/statm``, before and after); and seconds for one filtered search (``label`` = one
class of 10) with its hits looked up. Both sides run in the same invocation, alternating, so
the ratio holds on a busy machine. Prints a table and a JSON line.

Example::

    python scripts/bench_store.py --items 200000 --old-code ../old
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Builds and saves the index (in the process of the code under test).
_BUILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from retrieval.index.gallery import GalleryIndex
    xb = np.load(sys.argv[1])
    n = len(xb)
    labels = np.arange(n) % 10
    refs = [f"/photos/shop-{i % 97:02d}/image-{i:08d}.jpg" for i in range(n)]
    index = GalleryIndex.build(xb, refs, labels, [f"class{c}" for c in range(10)])
    t0 = time.perf_counter()
    index.save(sys.argv[2])
    print(json.dumps({"save_s": time.perf_counter() - t0}))
    """
)

#: Opens the index, searches once with a filter; prints seconds and memory as JSON.
_OPEN = textwrap.dedent(
    """
    import json, resource, sys, time
    import numpy as np
    import faiss
    from retrieval.index.gallery import GalleryIndex
    xq = np.random.default_rng(1).normal(size=(1, int(sys.argv[2]))).astype(np.float32)
    def rss_kb():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize() // 1024
    base, rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rss_kb()
    t0 = time.perf_counter()
    index = GalleryIndex.load(sys.argv[1])
    open_s = time.perf_counter() - t0
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    held = rss_kb() - rss0
    t0 = time.perf_counter()
    d, i = index.search(xq, 10, where={"label": "class3"})
    hits = index.hits(d[0], i[0])
    search_s = time.perf_counter() - t0
    assert len(hits) == 10 and {h.label for h in hits} == {"class3"}, hits
    print(json.dumps({"open_s": open_s, "open_mb": grown / 1024, "held_mb": held / 1024,
                      "search_s": search_s, "items": len(index)}))
    """
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=200_000, help="gallery size")
    p.add_argument("--dim", type=int, default=16, help="vector dimension")
    p.add_argument("--repeats", type=int, default=3, help="opens per folder (median kept)")
    p.add_argument(
        "--old-code",
        type=Path,
        default=None,
        help="a checkout of a version writing metadata.json (format 2), compared against",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder to work under (a temporary folder is made in it and removed)",
    )
    return p


def _run(code: str, repo: Path, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise SystemExit(f"{repo}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1024**2


def main(args: argparse.Namespace) -> dict:
    import numpy as np

    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    # a new folder of its own, even under --work: nothing there is overwritten
    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=args.work) as tmp:
        work = Path(tmp)
        vectors = work / "vectors.npy"
        rng = np.random.default_rng(0)
        np.save(vectors, rng.normal(size=(args.items, args.dim)).astype(np.float32))
        sides = {"sqlite store": (REPO, work / "store")}
        if args.old_code is not None:
            sides["metadata.json"] = (args.old_code.resolve(), work / "json")
        saved = {}
        for name, (repo, folder) in sides.items():
            saved[name] = json.loads(_run(_BUILD, repo, str(vectors), str(folder)))["save_s"]
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        for _ in range(args.repeats):  # alternating: both sides see the same machine load
            for name, (repo, folder) in sides.items():
                runs[name].append(json.loads(_run(_OPEN, repo, str(folder), str(args.dim))))
        out = {"items": args.items, "dim": args.dim, "repeats": args.repeats, "sides": {}}
        for name, (_, folder) in sides.items():
            out["sides"][name] = {
                "open_s": statistics.median(r["open_s"] for r in runs[name]),
                "open_mb": statistics.median(r["open_mb"] for r in runs[name]),
                "held_mb": statistics.median(r["held_mb"] for r in runs[name]),
                "search_s": statistics.median(r["search_s"] for r in runs[name]),
                "folder_mb": _folder_mb(folder),
                "save_s": saved[name],
            }
    print(
        f"{'':16}{'open s':>9}{'peak MB':>9}{'held MB':>9}{'search ms':>11}{'folder MB':>11}"
        f"{'save s':>9}"
    )
    for name, r in out["sides"].items():
        print(
            f"{name:16}{r['open_s']:9.3f}{r['open_mb']:9.1f}{r['held_mb']:9.1f}"
            f"{r['search_s'] * 1000:11.2f}{r['folder_mb']:11.1f}{r['save_s']:9.2f}"
        )
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
