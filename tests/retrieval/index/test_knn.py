"""The one exact kNN: FAISS's D, never the query itself, ties by position whatever the batch."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retrieval.errors import UserError
from retrieval.index.knn import (
    BLAS_DATABASE_BLOCK,
    blas_blocks,
    knn,
    knn_leave_one_out,
    normalize,
    user_scores,
)


def _duplicates(n=5000, distinct=500, dim=128, seed=0):
    """A gallery where every vector appears about n / distinct times."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(distinct, dim)).astype(np.float32)
    return base[rng.integers(0, distinct, size=n)]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_d_is_what_faiss_ranks_by(metric):
    rng = np.random.default_rng(1)
    xb, xq = rng.normal(size=(300, 8)), rng.normal(size=(7, 8))
    d, i = knn(xq, xb, 4, metric)
    if metric == "cosine":
        a, b = xq / np.linalg.norm(xq, axis=1)[:, None], xb / np.linalg.norm(xb, axis=1)[:, None]
        want = a @ b.T
        order = np.argsort(-want, axis=1)[:, :4]
    else:
        want = ((xq[:, None] - xb[None]) ** 2).sum(-1)  # squared, as FAISS
        order = np.argsort(want, axis=1)[:, :4]
    np.testing.assert_array_equal(i, order)
    np.testing.assert_allclose(d, np.take_along_axis(want, order, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(user_scores(np.array([4.0]), metric), [2.0 if metric == "l2" else 4])


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_exact_ties_come_lower_position_first(metric):
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    _, i = knn(x[[0, 1]], x, 5, metric)
    assert i.tolist() == [[0, 2, 3, 1, 4], [1, 4, 0, 2, 3]]
    _, i = knn_leave_one_out(x, 4, metric)
    assert i[3].tolist() == [0, 2, 1, 4]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_results_do_not_depend_on_the_batch_or_k(metric):
    x = _duplicates()
    q = np.arange(2000)
    d, i = knn(x[q], x, 200, metric, self_index=q)
    for rows in (np.arange(3, 2000), np.arange(0, 7), np.arange(7, 14), np.arange(40, 61)):
        d2, i2 = knn(x[rows], x, 200, metric, self_index=rows)
        np.testing.assert_array_equal(i2, i[rows])
        np.testing.assert_array_equal(d2, d[rows])
    _, i5 = knn(x[q], x, 5, metric, self_index=q)
    np.testing.assert_array_equal(i5, i[:, :5])
    tied = d[:, :-1] == d[:, 1:]
    assert tied.sum() > 10_000 and (i[:, 1:][tied] > i[:, :-1][tied]).all()


def test_the_query_itself_is_never_returned():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.7, 0.7]], dtype=np.float32)
    _, i = knn(x, x, 3, "cosine", self_index=np.arange(4))
    for q in range(4):
        assert q not in i[q] and len(set(i[q])) == 3
    assert i[0, 0] == 1 and i[1, 0] == 0  # its duplicate first
    with pytest.raises(UserError, match="cannot rank 4"):
        knn(x, x, 4, "cosine", self_index=np.arange(4))


def test_blas_blocks_apply_only_while_a_search_runs():
    before = faiss.cvar.distance_compute_blas_database_bs
    assert before != BLAS_DATABASE_BLOCK  # importing the module changed nothing
    with blas_blocks():
        assert faiss.cvar.distance_compute_blas_database_bs == BLAS_DATABASE_BLOCK
        with blas_blocks():
            pass
        assert faiss.cvar.distance_compute_blas_database_bs == BLAS_DATABASE_BLOCK
    knn(normalize(np.eye(3)), np.eye(3), 1)
    assert faiss.cvar.distance_compute_blas_database_bs == before
