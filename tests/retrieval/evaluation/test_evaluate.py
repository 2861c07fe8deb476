"""Evaluation against pytorch-metric-learning's AccuracyCalculator, protocols, scale."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from retrieval.errors import UserError
from retrieval.evaluation.evaluate import (
    align_labels,
    evaluate,
    kmeans_clusters,
    read_query_gallery_flags,
    split_query_gallery,
)
from retrieval.index.knn import normalize

PML_KEYS = {
    "precision_at_1": "recall@1",
    "r_precision": "r_precision",
    "mean_average_precision_at_r": "map@r",
    "NMI": "nmi",
    "AMI": "ami",
}


def pml(xq, yq, xb=None, yb=None, k="max_bin_count") -> dict:
    calc = AccuracyCalculator(include=tuple(PML_KEYS), k=k, device=torch.device("cpu"))
    if xb is None:
        got = calc.get_accuracy(xq, yq)
    else:
        got = calc.get_accuracy(xq, yq, xb, yb, ref_includes_query=False)
    return {PML_KEYS[key]: v for key, v in got.items()}


def tied_data(seed: int, n: int = 240):
    """Integer points on a small grid: many exact ties and duplicates; two singleton classes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 6, size=n)
    y[:2] = [50, 51]  # classes of size one
    x = (rng.integers(0, 3, size=(n, 3)) + y[:, None] % 3).astype(np.float32)
    return x, y


@pytest.mark.parametrize("seed", [0, 1])
def test_leave_one_out_matches_pml_with_ties_and_singletons(seed):
    x, y = tied_data(seed)
    ours = evaluate(x, y, ks=(1,), metric="l2")
    theirs = pml(x, y)
    assert ours.metrics["skipped_queries"] == 2
    for key, value in theirs.items():
        assert ours.metrics[key] == pytest.approx(value, abs=1e-12), key


def test_cosine_matches_pml_on_unit_vectors():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 8, size=400)
    x = (rng.normal(size=(8, 16))[y] + 1.2 * rng.normal(size=(400, 16))).astype(np.float32)
    ours = evaluate(x, y, ks=(1, 4), metric="cosine")
    theirs = pml(normalize(x), y)  # PML ranks by L2; on unit vectors that is the cosine order
    for key, value in theirs.items():
        assert ours.metrics[key] == pytest.approx(value, abs=1e-12), key


def test_cross_domain_matches_pml_and_skips_classes_missing_from_gallery():
    rng = np.random.default_rng(4)
    yq, yb = rng.integers(0, 7, size=150), rng.integers(0, 6, size=300)  # class 6: no gallery
    centers = rng.normal(size=(7, 8))
    xq = (centers[yq] + rng.normal(size=(150, 8))).astype(np.float32)
    xb = (centers[yb] + rng.normal(size=(300, 8))).astype(np.float32)
    ours = evaluate(xq, yq, xb, yb, ks=(1,), metric="l2")
    theirs = pml(xq, yq, xb, yb)
    assert ours.metrics["skipped_queries"] == int((yq == 6).sum()) > 0
    for key, value in theirs.items():
        assert ours.metrics[key] == pytest.approx(value, abs=1e-12), key


def test_kmeans_is_pmls_default():
    from pytorch_metric_learning.utils.inference import FaissKMeans

    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    theirs = FaissKMeans(niter=20, gpu=False)(torch.from_numpy(x), 5).numpy()
    assert np.array_equal(kmeans_clusters(x, 5), theirs)


def test_blocks_do_not_change_the_result():
    x, y = tied_data(7)
    a = evaluate(x, y, ks=(1, 3), metric="l2", block_size=4096, clustering=False)
    b = evaluate(x, y, ks=(1, 3), metric="l2", block_size=7, clustering=False)
    assert a.metrics == b.metrics
    assert np.array_equal(a.first_rank, b.first_rank)


def test_exact_first_rank_beyond_the_search_depth():
    # Pairs of items: R = 1, depth = 1, so most first hits lie beyond the searched list.
    rng = np.random.default_rng(8)
    y = np.repeat(np.arange(60), 2)
    x = rng.integers(0, 5, size=(120, 2)).astype(np.float32)
    ev = evaluate(x, y, ks=(1,), metric="l2", clustering=False)
    assert (ev.first_rank > 1).sum() > 30
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    for q in range(len(x)):
        order = [j for j in np.argsort(dist[q], kind="stable") if j != q]
        want = 1 + [y[j] for j in order].index(y[q])
        assert ev.first_rank[q] == want, q
    assert ev.metrics["mrr"] == pytest.approx(np.mean(1 / ev.first_rank))
    assert ev.curve["recall"][-1] == 1.0


def test_memory_is_linear_in_queries_not_quadratic():
    rng = np.random.default_rng(9)
    n = 10_000
    y = rng.integers(0, 500, size=n)  # ~20 per class: depth ~ 40; many first-rank fallbacks
    x = rng.normal(size=(n, 16)).astype(np.float32)
    tracemalloc.start()
    evaluate(x, y, ks=(1, 4), metric="cosine", block_size=1000, clustering=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.1 * n * n * 4, f"peak {peak / 1e6:.1f} MB"  # an n x n float32: 400 MB


def test_cosine_equals_l2_on_unit_vectors_with_exact_duplicates():
    """Ties (exact duplicates of different labels) are ranked by position under both metrics."""
    rng = np.random.default_rng(0)
    base = normalize(rng.normal(size=(60, 32)).astype(np.float32))
    pick = rng.integers(0, 60, size=1500)
    x = base[pick]  # every vector about 25 times, under random labels
    y = rng.integers(0, 4, size=1500)
    cos = evaluate(x, y, ks=(1, 5, 50), metric="cosine", clustering=False)
    l2 = evaluate(x, y, ks=(1, 5, 50), metric="l2", clustering=False)
    assert cos.metrics == l2.metrics
    for key in cos.per_query:
        np.testing.assert_array_equal(cos.per_query[key], l2.per_query[key])
    np.testing.assert_array_equal(cos.first_rank, l2.first_rank)


def test_errors_say_what_is_wrong():
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(UserError, match="no query has a relevant item"):
        evaluate(x, np.arange(4))
    with pytest.raises(UserError, match="recall@9"):
        evaluate(x, np.array([0, 0, 1, 1]), ks=(9,))
    with pytest.raises(UserError, match="unknown metric"):
        evaluate(x, np.array([0, 0, 1, 1]), metric="dot")
    with pytest.raises(UserError, match="labels"):
        evaluate(x, np.array([0, 0, 1]))


def test_query_gallery_flags_from_csv(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text(
        "path,label,split,is_query,is_gallery\na,x,test,1,0\nb,x,train,1,1\n"
        "c,y,test,true,yes\nd,y,test,0,1\n"
    )
    q, g = read_query_gallery_flags(csv, split="test")
    assert q.tolist() == [True, True, False] and g.tolist() == [False, True, True]
    qpos, gpos, self_index = split_query_gallery(q, g)
    assert qpos.tolist() == [0, 1] and gpos.tolist() == [1, 2] and self_index.tolist() == [-1, 0]
    (tmp_path / "bad.csv").write_text("path,label,is_query,is_gallery\na,x,maybe,1\n")
    with pytest.raises(UserError, match="line 2: is_query"):
        read_query_gallery_flags(tmp_path / "bad.csv")
    (tmp_path / "none.csv").write_text("path,label\na,x\n")
    with pytest.raises(UserError, match="is_query, is_gallery"):
        read_query_gallery_flags(tmp_path / "none.csv")
    with pytest.raises(UserError, match="0 queries"):
        split_query_gallery(np.zeros(2, bool), np.ones(2, bool))


def test_query_in_gallery_never_finds_itself():
    x, y = tied_data(10, n=60)
    q, g, s = split_query_gallery(np.arange(60) % 2 == 0, np.ones(60, bool))
    ev = evaluate(x[q], y[q], x[g], y[g], ks=(1,), metric="l2", self_index=s, clustering=False)
    loo = evaluate(x, y, ks=(1,), metric="l2", clustering=False)
    # every even item queries the full set minus itself: the leave-one-out rows of those items
    keep = np.isin(loo.query_index, q)
    assert np.array_equal(ev.first_rank, loo.first_rank[keep])


def test_align_labels_by_name():
    yq, yb, names = align_labels(np.array([0, 1]), ["cat", "dog"], np.array([1, 0]), ["dog", "cat"])
    assert names == ["cat", "dog"] and yq.tolist() == [0, 1] and yb.tolist() == [0, 1]
    with pytest.raises(UserError, match="share no class"):
        align_labels(np.array([0]), ["a"], np.array([0]), ["b"])
