from __future__ import annotations

import numpy as np
import torch

from retrieval.evaluation.calibration import calibrate
from retrieval.evaluation.decision_plots import calibration_curves, duplicate_groups
from retrieval.evaluation.duplicates import Group, keep_report

PNG = b"\x89PNG\r\n\x1a\n"


def test_calibration_curves_png(tmp_path):
    rng = np.random.default_rng(0)
    d = rng.uniform(0, 1, 200)
    cal = calibrate(d, rng.uniform(0, 1, 200) > d, "cosine", [0.9], [0.8])
    out = calibration_curves(cal, tmp_path / "calibration.png")
    assert out.read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.png"]  # no temp left


def test_duplicate_groups_png(tmp_path):
    refs = ["a.png", "b.png", "c.png", "d.png"]
    report = keep_report([Group((0, 1, 2), 0.01), Group((3, 0), 0.02)], refs, "first", [3, 2, 1, 0])
    seen = []

    def read(ref: str) -> torch.Tensor:
        seen.append(ref)
        return torch.full((3, 8, 8), 10 * len(seen), dtype=torch.uint8)

    out = duplicate_groups(report, read, tmp_path / "groups.png", max_members=2)
    assert out.read_bytes()[:8] == PNG
    assert seen == ["a.png", "b.png", "d.png", "a.png"]  # at most 2 members per group drawn
