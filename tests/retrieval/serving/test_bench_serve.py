"""``scripts/bench_serve.py`` at a tiny size: it runs end to end (its figures are asserted only
by the benchmark itself, never here); and a served process answers /health while loading."""

from __future__ import annotations

import importlib.util
import subprocess

import pytest

from tests.conftest import REPO


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_serve", REPO / "scripts/bench_serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_benchmark_runs_at_a_small_size(tmp_path):
    bench = _bench_module()
    out = tmp_path / "bench.json"
    args = bench.get_args_parser().parse_args(
        ["--n", "500", "--clients", "1,3", "--requests", "12", "--queries", "8"]
        + ["--max-batch", "4", "--out", str(out)]
    )
    report = bench.main(args)
    assert out.is_file() and report["index_type"] == "Flat"
    for mode, max_batch in (("batched", 4), ("unbatched", 1)):
        run = report[mode]
        assert run["max_batch"] == max_batch
        assert [r["clients"] for r in run["rows"]] == [1, 3]
        assert all(
            r["failures"] == 0 and r["requests"] == 12 // r["clients"] * r["clients"]
            for r in run["rows"]
        )
        assert 0 < run["first_health_s"] <= run["ready_s"]
    assert report["in_process"]["queries"] == 12 and report["in_process"]["throughput_qps"] > 0
    assert report["targets_at_8_clients"] is None  # 8 clients were not measured


@pytest.mark.slow
def test_a_server_that_cannot_load_stops_with_the_error(tmp_path):
    """The index loads after the server listens; when loading fails, the process ends with
    the error instead of serving 503s for ever."""
    bench = _bench_module()
    model = bench.make_checkpoint(tmp_path / "model.pt", 0)
    bench.build_gallery(model, tmp_path / "index", 50, "Flat", 0)
    other = bench.make_checkpoint(tmp_path / "other.pt", 1)  # not the index's model
    code = (
        "import sys; from retrieval.serving.server import serve; "
        f"serve(sys.argv[1], sys.argv[2], port={bench._free_port()})"
    )
    proc = subprocess.run(
        [bench.sys.executable, "-c", code, str(tmp_path / "index"), str(other)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "another model" in proc.stderr


def test_the_load_client_reads_a_response_that_arrives_in_pieces():
    bench = _bench_module()
    client = bench._Client.__new__(bench._Client)  # the parsing alone, without a connection
    client.buf = bytearray()
    response = (
        b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\nServer-Timing: batch;desc="3"\r\n\r\n'
        b'{"a": [1]}\n'
    )
    client.buf += response[:30]
    assert client.response() is None  # headers incomplete
    client.buf += response[30:-4]
    assert client.response() is None  # body incomplete
    client.buf += response[-4:] + b"HTTP/1.1 4"  # the next response begins
    status, headers, body = client.response()
    assert (status, headers["server-timing"], body) == (200, 'batch;desc="3"', b'{"a": [1]}\n')
    assert client.buf == b"HTTP/1.1 4"
