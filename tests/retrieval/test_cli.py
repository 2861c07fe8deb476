"""Every subcommand through the command line, and every bad input as a one-line error."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from retrieval.evaluation.evaluate import evaluate_embeddings
from retrieval.model.checkpoint import FORMAT
from tests.conftest import PER_CLASS, run_cli
from tests.retrieval.evaluation.test_metrics import brute_force


def test_train_writes_a_complete_run(trained_run):
    for name in ("best.pt", "last.pt", "config.yaml", "metrics.jsonl", "curves.png"):
        assert (trained_run / name).is_file(), name
    state = torch.load(trained_run / "best.pt", weights_only=True)
    assert state["format"] == FORMAT
    assert state["class_names"] == [f"digit{i}" for i in range(10)]
    assert state["model_config"]["embedding_dim"] == 128
    assert state["model_config"]["image_size"] == 16
    cfg = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert cfg["epochs"] == 1 and cfg["batch_size"] == 40 and cfg["device"] == "cpu"
    record = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= record["val_recall@1"] <= 1.0 and record["loss"] >= 0.0
    assert not [p for p in trained_run.iterdir() if p.name.startswith(".")]  # no temporaries


def test_train_config_file_and_overrides(tmp_path, digits_folder, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "epochs": 5,
                "batch_size": 40,
                "m_per_class": 8,
                "image_size": 12,
                "classes": "0-4",
                "data": str(digits_folder),
                "val_fraction": 0.2,
            }
        )
    )
    code, out, err = run_cli(
        ["train", "--config", cfg, "--epochs", "1", "--out", tmp_path / "run", "--device", "cpu"],
        capsys,
    )
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["epochs"] == 1  # the command line wins
    assert saved["image_size"] == 12 and saved["val_fraction"] == 0.2  # the file's values
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert state["model_config"]["image_size"] == 12

    cfg.write_text("epochs: 1\nlearning_rate: 0.1\n")
    code, _, err = run_cli(["train", "--config", cfg], capsys)
    assert code == 2 and "unknown configuration keys ['learning_rate']" in err


def test_embed(trained_run, digits_folder, tmp_path, capsys):
    code, out, err = run_cli(
        [
            "embed",
            digits_folder,
            "--model",
            trained_run / "best.pt",
            "--out",
            tmp_path / "emb.npy",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    emb = np.load(tmp_path / "emb.npy")
    ids = json.loads((tmp_path / "emb.ids.json").read_text())
    assert emb.shape == (10 * PER_CLASS, 128) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert len(ids["items"]) == len(emb) and ids["class_names"][0] == "digit0"


def test_evaluate_matches_brute_force(trained_run, digits_folder, tmp_path, capsys):
    run_cli(
        ["embed", digits_folder, "--model", trained_run / "best.pt", "--out", tmp_path / "e.npy"],
        capsys,
    )
    emb = np.load(tmp_path / "e.npy")
    labels = np.array(
        [it["label"] for it in json.loads((tmp_path / "e.ids.json").read_text())["items"]]
    )
    code, out, err = run_cli(
        [
            "evaluate",
            digits_folder,
            "--model",
            trained_run / "best.pt",
            "--json",
            "--ks",
            "1,2,4,8",
        ],
        capsys,
    )
    assert code == 0, err
    got = json.loads(out)
    want = brute_force(emb, labels, (1, 2, 4, 8))
    # FAISS ranks in float32, the reference in float64: near-ties may swap, hence 1e-4
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r"):
        assert got[key] == pytest.approx(want[key], abs=1e-4), key

    code, out, _ = run_cli(["evaluate", digits_folder, "--pixels", "--json"], capsys)
    pixels = json.loads(out)
    assert pixels["model"] == "raw pixels"
    from data.datasets import open_source
    from retrieval.evaluation.evaluate import pixel_vectors

    ds = open_source(str(digits_folder))
    assert pixels["map@r"] == pytest.approx(
        evaluate_embeddings(pixel_vectors(ds), ds.labels)["map@r"]
    )


def test_index_search_roundtrip(trained_run, digits_folder, tmp_path, capsys):
    index = tmp_path / "idx"
    code, out, err = run_cli(
        ["index", "build", digits_folder, "--model", trained_run / "best.pt", "--out", index],
        capsys,
    )
    assert code == 0, err
    code, out, _ = run_cli(["index", "info", index], capsys)
    assert code == 0 and "cosine" in out and str(10 * PER_CLASS) in out
    assert "metadata.sqlite (SQLite, wal)" in " ".join(out.split())
    query = sorted((digits_folder / "digit3").iterdir())[0]
    code, out, err = run_cli(
        ["search", index, query, "--k", "5", "--json", "--out", tmp_path / "grid.png"], capsys
    )
    assert code == 0, err
    results = json.loads(out)["queries"][0]["results"]
    assert len(results) == 5
    assert results[0]["ref"] == str(query) and results[0]["score"] == pytest.approx(1, abs=1e-4)
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    assert all(a["score"] >= b["score"] for a, b in zip(results, results[1:], strict=False))
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    code, out, _ = run_cli(["search", index, query, "--k", "3"], capsys)
    assert code == 0 and "similarity" in out and "digit3" in out


@pytest.mark.parametrize(
    "case",
    [
        "missing_image",
        "corrupt_image",
        "text_file",
        "wrong_index",
        "other_model",
        "bad_checkpoint",
        "missing_source",
        "bad_k",
        "k_zero",
        "text_checkpoint",
        "not_a_number",
    ],
)
def test_bad_input_is_one_line_exit_2(case, trained_run, digits_folder, tmp_path, capsys):
    index = tmp_path / "idx"
    run_cli(
        ["index", "build", digits_folder, "--model", trained_run / "best.pt", "--out", index],
        capsys,
    )
    good = sorted((digits_folder / "digit1").iterdir())[0]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    bad_ckpt = tmp_path / "bad.pt"
    bad_ckpt.write_bytes(b"garbage")
    text_ckpt = tmp_path / "notes.pt"
    text_ckpt.write_text("epoch: 3\nloss: 0.1\n")
    other = tmp_path / "other.pt"
    state = torch.load(trained_run / "best.pt", weights_only=True)
    state["model"] = {
        k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()
    }
    torch.save(state, other)
    args = {
        "missing_image": ["search", index, tmp_path / "nope.png"],
        "corrupt_image": ["search", index, corrupt],
        "text_file": ["search", index, text],
        "wrong_index": ["search", tmp_path, good],
        "other_model": ["search", index, good, "--model", other],
        "bad_checkpoint": ["embed", digits_folder, "--model", bad_ckpt, "--out", tmp_path / "e"],
        "missing_source": ["evaluate", tmp_path / "nothing", "--pixels"],
        "bad_k": ["evaluate", digits_folder, "--pixels", "--ks", "0,x"],
        "k_zero": ["search", index, good, "--k", "0"],
        "text_checkpoint": ["search", index, good, "--model", text_ckpt],
        "not_a_number": ["search", index, good, "--nprobe", "many"],
    }[case]
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines[0].startswith("error:"), err
    expected = {
        "missing_image": "no such file",
        "corrupt_image": "corrupt or truncated",
        "text_file": "not an image",
        "wrong_index": "not an index folder",
        "other_model": "built with another model",
        "bad_checkpoint": "not a readable checkpoint",
        "missing_source": "no such file or folder",
        "bad_k": "--ks",
        "k_zero": "--k",
        "text_checkpoint": "not a readable checkpoint",
        "not_a_number": "--nprobe",
    }[case]
    assert len(lines) == 1, err
    assert expected in " ".join(err.split()), err


def test_console_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "retrieval", "search", str(tmp_path / "none"), "x.png"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_demo_on_a_small_stand_in(fake_fmnist, tmp_path, capsys):
    code, out, err = run_cli(
        [
            "demo",
            "--out",
            tmp_path / "demo",
            "--epochs",
            "1",
            "--data-root",
            fake_fmnist,
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    result = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(result["table"]) == {"raw pixels", "untrained network", "trained network"}
    for row in result["table"].values():
        assert 0 <= row["map@r"] <= row["recall@1"] <= row["recall@8"] <= 1
    assert (tmp_path / "demo" / "queries.png").read_bytes()[:4] == b"\x89PNG"
    assert "trained network" in out and "MAP@R" in out
    # every query comes from the train split of an unseen class and is not in the gallery
    for s in result["searches"]:
        assert s["query"].startswith("fashion-mnist:train:")
        assert all(r["ref"].startswith("fashion-mnist:test:") for r in s["results"])


def test_train_uses_every_class_of_a_users_data_by_default(digits_folder, tmp_path, capsys):
    """The built-in dataset's 0-4 split belongs to the built-in dataset alone."""
    code, _, err = run_cli(
        [
            "train",
            "--data",
            digits_folder,
            "--epochs",
            "1",
            "--batch-size",
            "40",
            "--m-per-class",
            "4",
            "--image-size",
            "12",
            "--device",
            "cpu",
            "--out",
            tmp_path / "run",
        ],
        capsys,
    )
    assert code == 0, err
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert state["class_names"] == [f"digit{i}" for i in range(10)]


def test_progress_without_a_terminal_prints_lines(digits_folder, tmp_path, capsys):
    """Output to a file or a pipe: plain progress lines (here at each epoch's end), not nothing
    until the end."""
    code, _, err = run_cli(
        [
            "train",
            "--data",
            digits_folder,
            "--epochs",
            "2",
            "--batch-size",
            "40",
            "--m-per-class",
            "4",
            "--image-size",
            "12",
            "--device",
            "cpu",
            "--out",
            tmp_path / "run",
        ],
        capsys,
    )
    assert code == 0, err
    steps = (10 * PER_CLASS * 9 // 10) // 40
    for epoch in (1, 2):
        assert f"epoch {epoch}/2: {steps}/{steps}" in err, err


def test_progress_lines_are_rate_limited():
    from rich.console import Console

    from retrieval.cli._common import ProgressLines

    console = Console(record=True, width=200)
    lines = ProgressLines(console, interval=3600)
    task = lines.add_task("embedding", total=10)
    for _ in range(10):
        lines.advance(task, 1)
    printed = console.export_text().splitlines()
    assert len(printed) == 1 and printed[0].startswith("embedding: 10/10"), printed


def test_folders_as_people_keep_them(trained_run, digits_folder, tmp_path, capsys):
    """Loose images beside class folders are indexed too; --labels none ignores folders; a plain
    folder of queries is searched."""
    top = tmp_path / "top"
    (top / "shoes").mkdir(parents=True)
    for n, f in enumerate(sorted((digits_folder / "digit1").iterdir())):
        (top / "shoes" / f.name).write_bytes(f.read_bytes())
        (top / f"loose{n}.png").write_bytes(
            sorted((digits_folder / "digit2").iterdir())[n].read_bytes()
        )
    ck = trained_run / "best.pt"
    code, out, err = run_cli(
        ["index", "build", top, "--model", ck, "--out", tmp_path / "a", "--device", "cpu"], capsys
    )
    assert code == 0 and f"indexed {2 * PER_CLASS} images" in out, err
    code, out, err = run_cli(
        [
            "index",
            "build",
            top,
            "--model",
            ck,
            "--out",
            tmp_path / "b",
            "--labels",
            "none",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    code, out, err = run_cli(
        ["search", tmp_path / "b", top / "shoes", "--k", "1", "--json", "--device", "cpu"], capsys
    )
    assert code == 0, err
    queries = json.loads(out)["queries"]
    assert len(queries) == PER_CLASS
    assert {q["results"][0]["label"] for q in queries} == {"unlabelled"}
    assert all(q["results"][0]["ref"] == q["query"] for q in queries)  # each finds itself


def test_indexed_files_carry_their_content_hash(trained_run, digits_folder, tmp_path, capsys):
    import hashlib
    import shutil

    from retrieval.index.gallery import GalleryIndex

    folder = tmp_path / "gallery"
    shutil.copytree(digits_folder / "digit1", folder / "digit1")
    index = tmp_path / "idx"
    model = ["--model", trained_run / "best.pt"]
    assert run_cli(["index", "build", folder, *model, "--out", index], capsys)[0] == 0
    extra = tmp_path / "extra.png"
    shutil.copy(sorted((digits_folder / "digit2").iterdir())[0], extra)
    assert run_cli(["index", "add", index, extra, "--label", "digit2"], capsys)[0] == 0
    new = folder / "digit3"
    shutil.copytree(digits_folder / "digit3", new)
    assert run_cli(["index", "sync", index, folder], capsys)[0] == 0

    loaded = GalleryIndex.load(index)
    rows = loaded.store.get(list(loaded.items))
    assert len(rows) == 2 * PER_CLASS + 1  # digit1, the added file, digit3
    for row in rows:
        assert row.sha256 == hashlib.sha256(Path(row.ref).read_bytes()).hexdigest(), row.ref


def test_manifest_columns_become_fields_to_filter_on(
    trained_run, digits_folder, tmp_path, capsys, caplog
):
    import hashlib

    images = sorted((digits_folder / "digit4").iterdir())[:12]
    colours = {str(p.resolve()): ("red" if n % 3 == 0 else "blue") for n, p in enumerate(images)}
    manifest = tmp_path / "m.csv"
    # a column named as an index field of its own ("id") is not stored: --where id= is the id
    lines = ["path,label,colour,id"] + [f"{p},four,{c},SKU-7" for p, c in colours.items()]
    manifest.write_text("\n".join(lines) + "\n")
    index = tmp_path / "idx"
    model = ["--model", trained_run / "best.pt"]
    with caplog.at_level(logging.WARNING):
        assert run_cli(["index", "build", manifest, *model, "--out", index], capsys)[0] == 0
    assert "column(s) id are not stored" in caplog.text
    query = images[1]
    code, out, err = run_cli(
        ["search", index, query, "--k", "10", "--json", "--where", "colour=red"], capsys
    )
    assert code == 0, err
    hits = json.loads(out)["queries"][0]["results"]
    assert sorted(h["ref"] for h in hits) == sorted(r for r, c in colours.items() if c == "red")
    digest = hashlib.sha256(images[5].read_bytes()).hexdigest()
    code, out, err = run_cli(
        ["search", index, query, "--json", "--where", f"sha256={digest}"], capsys
    )
    assert [h["ref"] for h in json.loads(out)["queries"][0]["results"]] == [
        str(images[5].resolve())
    ]
    code, out, err = run_cli(["search", index, query, "--json", "--where", "id=3"], capsys)
    assert code == 0 and [h["id"] for h in json.loads(out)["queries"][0]["results"]] == [3]
    code, _, err = run_cli(["search", index, query, "--where", "color=red"], capsys)
    assert code == 2 and "the fields are: label, id, ref, sha256, colour" in " ".join(err.split())
