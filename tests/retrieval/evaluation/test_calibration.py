from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from retrieval.errors import UserError
from retrieval.evaluation.calibration import (
    BEST_F1,
    CALIBRATION_FILE,
    CALIBRATION_VERSION,
    NO_MATCH,
    Calibration,
    calibrate,
    choose_cutpoints,
    classification_at,
    decision_at,
    match,
    nearest_outcome,
    sweep,
    to_distance,
)


def brute_force(d: np.ndarray, ok: np.ndarray) -> list[dict]:
    """Every distinct finite distance as a threshold, counted one query at a time."""
    rows = []
    for t in sorted(set(d[np.isfinite(d)].tolist())):
        tp = fp = fn = tn = 0
        for x, c in zip(d.tolist(), ok.tolist(), strict=True):
            accepted = x <= t
            tp += c and accepted
            fp += (not c) and accepted
            fn += c and not accepted
            tn += (not c) and not accepted
        p = tp / (tp + fp) if tp + fp else 1.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        fpr = fp / (fp + tn) if fp + tn else 0.0
        rows.append(dict(t=t, tp=tp, fp=fp, p=p, r=r, f1=f1, fpr=fpr, n=tp + fp))
    return rows


def labelled_set(seed: int = 0, n_classes: int = 6, per_class: int = 8, open_classes: int = 2):
    """Clustered vectors: a gallery of ``n_classes`` classes; queries from the same classes
    plus ``open_classes`` classes the gallery lacks. Distances are rounded to create ties."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes + open_classes, 16)).astype(np.float32)
    xb = np.repeat(centres[:n_classes], per_class, 0) + 0.6 * rng.normal(
        size=(n_classes * per_class, 16)
    ).astype(np.float32)
    yb = np.repeat(np.array([f"c{i}" for i in range(n_classes)]), per_class)
    nq = (n_classes + open_classes) * 5
    yq_num = np.repeat(np.arange(n_classes + open_classes), 5)
    xq = centres[yq_num] + 0.6 * rng.normal(size=(nq, 16)).astype(np.float32)
    yq = np.array([f"c{i}" for i in yq_num])
    d, i = faiss.knn(xq, xb, 3, metric=faiss.METRIC_L2)
    d = np.round(np.sqrt(d), 1)  # ties on purpose
    return d, i, yq, yb, yq_num >= n_classes


def test_sweep_equals_brute_force_with_ties_and_open_set():
    d, i, yq, yb, _ = labelled_set()
    dist, ok = nearest_outcome(d, i, yq, yb)
    assert len(np.unique(dist)) < len(dist)  # the set does have ties
    s = sweep(dist, ok)
    ref = brute_force(dist, ok)
    assert s.thresholds.tolist() == [r["t"] for r in ref]
    assert s.tp.tolist() == [r["tp"] for r in ref]
    assert s.fp.tolist() == [r["fp"] for r in ref]
    assert s.matched.tolist() == [r["n"] for r in ref]
    np.testing.assert_allclose(s.precision, [r["p"] for r in ref])
    np.testing.assert_allclose(s.recall, [r["r"] for r in ref])
    np.testing.assert_allclose(s.f1, [r["f1"] for r in ref])
    np.testing.assert_allclose(s.fpr, [r["fpr"] for r in ref])


@pytest.mark.parametrize("seed", range(5))
def test_cutpoints_equal_brute_force_choice(seed):
    rng = np.random.default_rng(seed)
    dist = np.round(rng.uniform(0, 1, 60), 2)
    ok = rng.uniform(0, 1, 60) > dist  # nearer neighbours are more often right
    targets_p, targets_r = [0.8, 0.9, 1.0], [0.5, 0.9]
    cps, unmet = choose_cutpoints(sweep(dist, ok), targets_p, targets_r)
    ref = brute_force(dist, ok)
    best = max(r["f1"] for r in ref)
    assert cps[BEST_F1].distance == max(r["t"] for r in ref if r["f1"] == best)
    assert cps[BEST_F1].f1 == pytest.approx(best)
    for p in targets_p:
        meets = [r for r in ref if r["p"] >= p]
        if meets:
            assert cps[f"precision_{p:g}"].distance == meets[-1]["t"]
            assert cps[f"precision_{p:g}"].precision >= p
        else:
            assert f"precision_{p:g}" in unmet
    for r_target in targets_r:
        meets = [r for r in ref if r["r"] >= r_target]
        assert cps[f"recall_{r_target:g}"].distance == meets[0]["t"]


def test_open_set_queries_come_out_no_match_at_calibrated_cutpoint():
    # gallery: two tight clusters; calibration queries: near them (right label) and from a
    # third, far class (open set); then new open-set queries are decided with the cut-point
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
    xb = np.concatenate(
        [centres[0] + rng.normal(size=(20, 2)), centres[1] + rng.normal(size=(20, 2))]
    )
    xb = xb.astype(np.float32)
    yb = np.array(["a"] * 20 + ["b"] * 20)

    def queries(n):
        y = rng.integers(0, 3, n)
        return (centres[y] + 0.5 * rng.normal(size=(n, 2))).astype(np.float32), y

    xq, y = queries(90)
    d, i = faiss.knn(xq, xb, 1, metric=faiss.METRIC_L2)
    names = np.array(["a", "b", "c"])[y]
    dist, ok = nearest_outcome(np.sqrt(d), i, names, yb)
    cal = calibrate(dist, ok, "l2", target_precision=[0.99], open_set=y == 2)
    assert cal.open_set_queries == int((y == 2).sum())
    cut = cal.cutpoint("precision_0.99")
    assert cut.precision == 1.0 and cut.recall == 1.0  # the classes are separable

    xq2, y2 = queries(60)
    d2, i2 = faiss.knn(xq2, xb, 1, metric=faiss.METRIC_L2)
    decided = match(np.sqrt(d2[:, 0]), yb[i2[:, 0]].tolist(), cal.cutpoint())
    open_decisions = [dec for dec, cls in zip(decided, y2, strict=True) if cls == 2]
    known = [(dec, "ab"[cls]) for dec, cls in zip(decided, y2, strict=True) if cls != 2]
    assert open_decisions and set(open_decisions) == {NO_MATCH}
    assert all(dec in (want, NO_MATCH) for dec, want in known)  # never the wrong class
    # the cut-point is the farthest right match seen in calibration: a few new queries of
    # known classes lie past it
    assert sum(dec == want for dec, want in known) >= 0.8 * len(known)
    dist2, ok2 = nearest_outcome(np.sqrt(d2), i2, np.array(["a", "b", "c"])[y2], yb)
    fig = classification_at(dist2, ok2, cut.distance, open_set=y2 == 2)
    assert fig["open_set_no_match"] == 1.0
    assert fig["precision"] == 1.0 and fig["fpr"] == 0.0


def test_classification_at_equals_sweep_at_each_threshold():
    d, i, yq, yb, open_set = labelled_set(seed=3)
    dist, ok = nearest_outcome(d, i, yq, yb)
    s = sweep(dist, ok)
    for j in range(len(s.thresholds)):
        fig = classification_at(dist, ok, float(s.thresholds[j]), open_set)
        assert fig["tp"] == s.tp[j] and fig["fp"] == s.fp[j]
        assert fig["f1"] == pytest.approx(s.f1[j])
        assert fig["fn"] + fig["tp"] == s.positives
        assert fig["open_set_no_match"] == pytest.approx(
            float((dist[open_set] > s.thresholds[j]).mean())
        )


def test_nearest_outcome_no_neighbour_and_open_set_never_correct():
    d, ok = nearest_outcome(
        np.array([[0.2, 0.3], [np.inf, np.inf]]),
        np.array([[0, 1], [-1, -1]]),
        np.array(["x", "x"]),
        np.array(["x", "y"]),
    )
    assert d.tolist() == [0.2, np.inf] and ok.tolist() == [True, False]
    s = sweep(d, ok)
    assert s.thresholds.tolist() == [0.2]  # inf is not a threshold
    assert s.negatives == 1 and s.fp.tolist() == [0]


def test_match_accepts_float32_distance_at_exactly_the_cutpoint(tmp_path):
    d = np.float32([0.1, 0.3])  # 0.3 is not a float64 number: the cut-point must still hold it
    cal = calibrate(d, np.array([True, True]), "cosine")
    cal.save(tmp_path)
    t = Calibration.load(tmp_path).cutpoint()
    assert t.distance == float(np.float32(0.3))
    assert match(d, ["a", "b"], t) == ["a", "b"]
    assert match(np.float32([0.3001]), ["a"], t) == [NO_MATCH]


def test_save_load_roundtrip_leaves_other_files(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    rng = np.random.default_rng(0)
    dist = rng.uniform(0, 2, 50).astype(np.float32)
    cal = calibrate(dist, rng.uniform(0, 2, 50) > dist, "cosine", [0.9], [0.5])
    cal.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CALIBRATION_FILE, "manifest.json"]
    assert (tmp_path / "manifest.json").read_text() == "{}"
    back = Calibration.load(tmp_path)
    assert back == cal
    assert back.cutpoint().distance == float(np.float32(back.cutpoint().distance))  # exact
    assert json.loads((tmp_path / CALIBRATION_FILE).read_text())["version"] == CALIBRATION_VERSION


def test_load_refuses_missing_newer_and_damaged(tmp_path):
    with pytest.raises(UserError, match="retrieval calibrate"):
        Calibration.load(tmp_path)
    path = tmp_path / CALIBRATION_FILE
    path.write_text(json.dumps({"version": CALIBRATION_VERSION + 1}))
    with pytest.raises(UserError, match="newer"):
        Calibration.load(tmp_path)
    path.write_text(json.dumps({"version": 1, "metric": "cosine"}))
    with pytest.raises(UserError, match="damaged"):
        Calibration.load(tmp_path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        Calibration.load(tmp_path)


def test_unknown_cutpoint_and_bad_targets_are_user_errors():
    cal = calibrate(np.array([0.1, 0.2]), np.array([True, False]), "l2", target_recall=[1.0])
    with pytest.raises(UserError, match="best_f1, recall_1"):
        cal.cutpoint("precision_0.9")
    with pytest.raises(UserError, match="fraction"):
        calibrate(np.array([0.1]), np.array([True]), "l2", target_precision=[95])
    with pytest.raises(UserError, match="neighbour"):
        calibrate(np.array([np.inf]), np.array([False]), "l2")


def test_unmet_target_is_reported_not_invented():
    cal = calibrate(np.array([0.1, 0.2]), np.array([False, True]), "l2", target_precision=[1.0])
    # precision at 0.1 is 0, at 0.2 it is 0.5: no threshold reaches 1.0
    assert cal.unmet == ["precision_1"] and "precision_1" not in cal.cutpoints


def test_to_distance_cosine_similarity():
    assert to_distance(np.array([0.9]), "cosine", True).tolist() == pytest.approx([0.1])
    with pytest.raises(ValueError):
        to_distance(np.array([0.9]), "l2", True)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_decision_at_equals_brute_force_search(metric):
    rng = np.random.default_rng(4)
    xb = rng.normal(size=(40, 6)).astype(np.float32)
    yb = rng.integers(0, 4, 40)
    xq = rng.normal(size=(25, 6)).astype(np.float32)
    yq = rng.integers(0, 6, 25)  # classes 4 and 5 are not in the gallery
    if metric == "cosine":
        u = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
        dm = 1 - u(xq).astype(np.float64) @ u(xb).T.astype(np.float64)
    else:
        dm = np.linalg.norm(xq[:, None].astype(np.float64) - xb[None], axis=2)
    nn = dm.argmin(axis=1)
    d_ref, ok_ref = dm[np.arange(25), nn], yb[nn] == yq
    srt = np.sort(d_ref)
    t = float(srt[12] + srt[13]) / 2  # between two distances: float32 rounding cannot flip
    got = decision_at(xq, yq, t, xb, yb, metric)
    want = classification_at(d_ref, ok_ref, t, open_set=yq >= 4)
    assert got["tp"] == want["tp"] and got["fp"] == want["fp"]
    assert got["open_set_queries"] == int((yq >= 4).sum()) > 0
    assert got["open_set_no_match"] == pytest.approx(want["open_set_no_match"])


def test_decision_at_leave_one_out_never_matches_itself():
    x = np.array([[0.0], [0.1], [5.0], [5.05], [20.0]], np.float32)
    y = np.array(["a", "a", "b", "b", "c"])  # "c" has no other item: open set
    r = decision_at(x, y, 0.2, metric="l2")
    assert (r["tp"], r["fp"], r["tn"]) == (4, 0, 1)  # the lone item is not its own match
    assert r["open_set_queries"] == 1 and r["open_set_no_match"] == 1.0
