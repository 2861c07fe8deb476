"""A folder of photos searched from the first command: a named pretrained model, a nested
unlabelled folder of mixed formats, folder sync, and a model mismatch refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from tests.conftest import run_cli

pytest.importorskip("efficientnet_lite_pytorch")

FORMATS = ["jpg", "png", "webp", "bmp", "gif", "tif"]


def _photos(n: int, seed: int = 0) -> list[Image.Image]:
    """Distinct photo crops of different sizes from scikit-learn's two sample photos."""
    rng = np.random.default_rng(seed)
    sources = load_sample_images().images
    out = []
    for i in range(n):
        src = sources[i % 2]
        h, w = rng.integers(120, 260), rng.integers(120, 300)
        y, x = rng.integers(0, src.shape[0] - h), rng.integers(0, src.shape[1] - w)
        out.append(Image.fromarray(src[y : y + h, x : x + w]))
    return out


@pytest.fixture()
def photos(tmp_path):
    root = tmp_path / "photos"
    for n, img in enumerate(_photos(12)):
        folder = root / ("2024" if n % 2 else "2025") / ("trip" if n % 3 else "")
        folder.mkdir(parents=True, exist_ok=True)
        fmt = FORMATS[n % len(FORMATS)]
        img.save(folder / f"img{n:02d}.{fmt}")
    rotated = _photos(13)[12]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side; shown upright by a viewer that honours EXIF
    rotated.rotate(90, expand=True).save(root / "2025" / "phone.jpg", exif=exif, quality=95)
    (root / "2024" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_a_photo_folder_indexes_and_searches_with_a_named_model(photos, tmp_path, capsys, caplog):
    idx = tmp_path / "photos.index"
    code, out, err = run_cli(
        [
            "index",
            "build",
            photos,
            "--model",
            "efficientnet_lite0",
            "--out",
            idx,
            "--labels",
            "none",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    assert "indexed 13 images" in out  # 12 + the phone photo; the broken file skipped
    assert "broken.jpg" in caplog.text  # listed once, in one warning
    manifest = json.loads((idx / "manifest.json").read_text())
    assert manifest["model_path"] == "efficientnet_lite0"
    assert manifest["preprocessing"]["image_size"] == 224
    where = {f.stem: f for f in photos.rglob("*") if f.is_file()}
    original = where["img07"]
    copy = tmp_path / "copy.jpg"
    img = Image.open(original)
    img.resize((img.width // 2, img.height // 2)).convert("RGB").save(copy, quality=60)
    upright = tmp_path / "upright.png"
    Image.open(photos / "2025" / "phone.jpg").transpose(Image.Transpose.ROTATE_270).save(upright)
    code, out, err = run_cli(
        ["search", idx, copy, upright, "--k", "3", "--json", "--device", "cpu"], capsys
    )
    assert code == 0, err
    first = [q["results"][0]["ref"] for q in json.loads(out)["queries"]]
    assert first == [str(original), str(photos / "2025" / "phone.jpg")]

    where["img01"].unlink()
    _photos(15)[14].save(photos / "2024" / "new.png")
    code, out, err = run_cli(["index", "sync", idx, photos, "--device", "cpu"], capsys)
    assert code == 0 and "added 1, removed 1; it holds 13" in " ".join(out.split()), err
    code, out, err = run_cli(
        ["search", idx, photos / "2024" / "new.png", "--k", "1", "--json", "--device", "cpu"],
        capsys,
    )
    assert json.loads(out)["queries"][0]["results"][0]["ref"] == str(photos / "2024" / "new.png")
    code, out, err = run_cli(["index", "sync", idx, photos, "--device", "cpu"], capsys)
    assert "added 0, removed 0" in " ".join(out.split()), err


def test_a_named_model_and_a_checkpoint_do_not_mix(photos, trained_run, tmp_path, capsys):
    idx = tmp_path / "photos.index"
    code, _, err = run_cli(
        [
            "index",
            "build",
            photos,
            "--model",
            "efficientnet_lite0",
            "--image-size",
            "96",
            "--out",
            idx,
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    code, _, err = run_cli(
        ["search", idx, photos / "2025" / "phone.jpg", "--model", trained_run / "best.pt"], capsys
    )
    assert code == 2 and "rebuild the index" in " ".join(err.split()), err
