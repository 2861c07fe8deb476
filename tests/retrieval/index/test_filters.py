"""Filtered search: the filter language, and filtered results against brute force over the
matching subset, for every index family."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.errors import UserError
from retrieval.index.filters import freeze, matching_ids, parse_where, thaw
from retrieval.index.gallery import GalleryIndex
from retrieval.index.knn import knn

N, DIM, NQ, K = 2000, 16, 25, 10
CLASSES = ["a", "b", "c", "d", "e"]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(xb, labels, xq)``: clustered vectors (so that IVF lists differ), 5 labels."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, DIM)).astype(np.float32) * 3
    xb = centres[rng.integers(0, 20, N)] + rng.normal(size=(N, DIM)).astype(np.float32)
    xq = centres[rng.integers(0, 20, NQ)] + rng.normal(size=(NQ, DIM)).astype(np.float32)
    return xb, rng.integers(0, len(CLASSES), N), xq


def _build(data, index_type: str, metric: str = "l2") -> GalleryIndex:
    xb, labels, _ = data
    refs = [f"/img/{i}.png" for i in range(N)]
    return GalleryIndex.build(xb, refs, labels, CLASSES, metric=metric, index_type=index_type)


def _exact_on_subset(data, subset: np.ndarray, metric: str, k: int = K) -> np.ndarray:
    xb, _, xq = data
    _, pos = knn(xq, xb[subset], k, metric)
    return subset[pos]


# ------------------------------------------------------------------------- the language


def test_parse_where_ands_conditions_and_ors_lists():
    assert parse_where([]) == {}
    assert parse_where(["label=Sneaker"]) == {"label": ["Sneaker"]}
    assert parse_where(["label = Sneaker, Sandal", "id=3"]) == {
        "label": ["Sneaker", "Sandal"],
        "id": ["3"],
    }
    # the same field twice: AND keeps the values both allow
    assert parse_where(["label=a,b,c", "label=c,b,z"]) == {"label": ["b", "c"]}
    # JSON, for values holding commas
    assert parse_where(['{"label": ["T-shirt, top", "Bag"], "id": 4}']) == {
        "label": ["T-shirt, top", "Bag"],
        "id": ["4"],
    }


@pytest.mark.parametrize("bad", ["label", "=Sneaker", "label=", "label=a,,b", "{not json", "[1]"])
def test_parse_where_refuses_malformed_conditions(bad):
    with pytest.raises(UserError, match="where"):
        parse_where([bad])


def test_freeze_is_order_independent_and_reversible():
    a = freeze({"label": ["b", "a"], "id": [1]})
    assert a == freeze({"id": ["1"], "label": ["a", "b"]})
    assert hash(a) == hash(freeze({"id": "1", "label": ("a", "b")}))
    assert thaw(a) == {"id": ["1"], "label": ["a", "b"]}
    assert freeze({}) is None and thaw(None) is None


def test_matching_ids_by_label_id_and_ref(data):
    index = _build(data, "Flat")
    labels = data[1]
    assert matching_ids(index, {"label": "c"}).tolist() == np.flatnonzero(labels == 2).tolist()
    both = matching_ids(index, {"label": ["a", "e"], "id": list(range(100))})
    assert both.tolist() == [i for i in range(100) if labels[i] in (0, 4)]
    assert matching_ids(index, {"ref": ["/img/7.png", "/img/9.png", "/nope"]}).tolist() == [7, 9]


def test_unknown_fields_and_labels_are_one_line_errors(data):
    index = _build(data, "Flat")
    xq = data[2]
    with pytest.raises(UserError, match=r"cannot filter on 'colour'; the fields are: label, id"):
        index.search(xq, 5, where={"colour": "red"})
    with pytest.raises(UserError, match=r"no label 'z' in this index; its labels: a, b, c, d, e"):
        index.search(xq, 5, where={"label": ["a", "z"]})
    with pytest.raises(UserError, match="id takes whole numbers"):
        index.search(xq, 5, where={"id": "seven"})


# ------------------------------------------------------------------------- exact families


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("index_type", ["Flat", "IVF16,Flat"])
def test_filtered_search_equals_brute_force_on_the_subset(data, index_type, metric):
    index = _build(data, index_type, metric)
    nprobe = 16 if index.family == "ivf" else None  # every list: exact
    xq, labels = data[2], data[1]
    for where, subset in [
        ({"label": "b"}, np.flatnonzero(labels == 1)),
        ({"label": ["a", "d"]}, np.flatnonzero(np.isin(labels, [0, 3]))),
        ({"id": list(range(0, N, 97))}, np.arange(0, N, 97)),  # 21 items: a sparse filter
    ]:
        d, i = index.search(xq, K, nprobe=nprobe, where=where)
        expected = _exact_on_subset(data, subset, metric)
        assert i.tolist() == expected.tolist(), where
        assert np.isin(i, subset).all()
        unfiltered = index.search(xq, K, nprobe=nprobe)[1]
        assert not np.isin(unfiltered, subset).all()  # the filter did change the results


def test_filtered_search_after_removals(data):
    """Removed items never come back, filtered or not (IVF removes from its lists)."""
    index = _build(data, "IVF16,Flat")
    labels = data[1]
    removed = np.flatnonzero(labels == 1)[::2]
    index.remove(removed.tolist())
    subset = np.setdiff1d(np.flatnonzero(labels == 1), removed)
    _, i = index.search(data[2], K, nprobe=16, where={"label": "b"})
    assert i.tolist() == _exact_on_subset(data, subset, "l2").tolist()


def test_a_filter_matching_few_items_caps_k_and_none_gives_empty_rows(data):
    index = _build(data, "Flat")
    d, i = index.search(data[2], K, where={"id": [5, 6, 7]})
    assert i.shape == (NQ, 3) and set(i.ravel().tolist()) == {5, 6, 7}
    first_b = int(np.flatnonzero(data[1] == 1)[0])
    d, i = index.search(data[2], K, where={"label": "a", "id": [first_b, N + 5]})
    assert i.shape == d.shape == (NQ, 0)


# ------------------------------------------------------------------------- compressed codes


@pytest.mark.parametrize("index_type", ["SQ8", "OPQ4,IVF16,PQ4x4", "IVF16,PQ4x4"])
def test_compressed_filtered_search_equals_the_unfiltered_ranking_on_the_subset(data, index_type):
    """Compressed codes give approximate distances, so brute force here is the index's own
    ranking of every item, restricted to the subset."""
    index = _build(data, index_type)
    nprobe = 16 if index.family == "ivf" else None
    xq, labels = data[2], data[1]
    subset = np.flatnonzero(np.isin(labels, [2, 4]))
    d, i = index.search(xq, K, nprobe=nprobe, where={"label": ["c", "e"]})
    d_all, i_all = index.search(xq, N, nprobe=nprobe)
    for q in range(NQ):
        keep = np.isin(i_all[q], subset)
        np.testing.assert_allclose(d[q], d_all[q][keep][:K], rtol=1e-5)
        # equal distances may come in either order: compare the ids up to ties
        assert set(i[q][d[q] < d[q][-1]]) <= set(i_all[q][keep][:K])
        assert np.isin(i[q], subset).all()


# ------------------------------------------------------------------------- HNSW


def test_hnsw_filtered_search_recall_against_brute_force(data):
    """HNSW walks the whole graph and keeps the matching nodes: with a generous efSearch its
    filtered results match brute force on the subset (recall@10 >= 0.95)."""
    index = _build(data, "HNSW16")
    xq, labels = data[2], data[1]
    for where, subset in [
        ({"label": "b"}, np.flatnonzero(labels == 1)),  # a fifth of the gallery
        ({"id": list(range(0, N, 25))}, np.arange(0, N, 25)),  # 4 %: still the graph
    ]:
        _, i = index.search(xq, K, ef_search=512, where=where)
        assert np.isin(i, subset).all()
        expected = _exact_on_subset(data, subset, "l2")
        recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(i, expected, strict=True)])
        assert recall >= 0.95, (where, recall)


def test_hnsw_filter_also_excludes_tombstones(data):
    index = _build(data, "HNSW16")
    labels = data[1]
    removed = np.flatnonzero(labels == 1)[:50].tolist()  # under the rebuild threshold
    index.remove(removed)
    assert index.tombstones == set(removed)
    _, i = index.search(data[2], K, ef_search=512, where={"label": "b"})
    assert not np.isin(i, removed).any() and np.isin(i, np.flatnonzero(labels == 1)).all()


@pytest.mark.parametrize("index_type", ["Flat", "HNSW16"])
def test_filter_columns_follow_adds_and_removes(data, index_type):
    """The label array the filters read is updated in place by changes, not rebuilt: it must
    stay equal to the items."""
    index = _build(data, index_type)
    xb, labels, xq = data
    index.columns()  # made now, then kept up to date
    new = index.add(xb[:30], [f"/new/{i}" for i in range(30)], np.full(30, index.label_id("f")))
    index.remove([3, 4, int(new[0]), int(new[5])])
    ids, labs = index.columns()
    assert ids.tolist() == index.ids.tolist() and labs.tolist() == index.labels.tolist()
    expected = [int(i) for i in new if i not in (new[0], new[5])]
    assert matching_ids(index, {"label": "f"}).tolist() == expected
    _, i = index.search(
        xq, 5, where={"label": "f"}, **({"ef_search": 256} if "HNSW" in index_type else {})
    )
    # HNSW may find fewer than k of 28 items out of 2000 (-1 pads): never a wrong one
    assert np.isin(i[i >= 0], expected).all()
    assert index_type != "Flat" or (i >= 0).all()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_hnsw_filter_keeping_few_items_is_searched_exactly(data, metric):
    """A filter keeping at most HNSW_EXACT_FILTER_FRACTION of the graph scans the matching
    stored vectors: the brute-force result, ids and scores, even at a small efSearch."""
    from retrieval.index.gallery import HNSW_EXACT_FILTER_FRACTION

    index = _build(data, "HNSW16", metric)
    index.remove([0, 100])  # tombstones: in the graph, never returned
    subset = np.setdiff1d(np.arange(0, N, 100), [0, 100])  # 18 items, 0.9 % of the graph
    assert len(subset) <= HNSW_EXACT_FILTER_FRACTION * index.index.ntotal
    d, i = index.search(data[2], K, ef_search=16, where={"id": list(range(0, N, 100))})
    assert i.tolist() == _exact_on_subset(data, subset, metric).tolist()
    flat = _build(data, "Flat", metric)
    flat.remove([0, 100])
    d_flat, _ = flat.search(data[2], K, where={"id": subset.tolist()})
    np.testing.assert_allclose(d, d_flat, rtol=1e-5, atol=1e-5)


def test_hnsw_exact_filter_path_with_compressed_storage(data):
    """Scalar-quantized storage is scanned like flat vectors (the same codes as an ``SQ8``
    index); PQ storage refuses an ``IDSelector``, so a rare filter walks its graph instead."""
    where = {"id": list(range(0, N, 100))}  # 20 items, 1 %
    sq_graph = _build(data, "HNSW16_SQ8")
    d, i = sq_graph.search(data[2], K, ef_search=16, where=where)
    d_sq, i_sq = _build(data, "SQ8").search(data[2], K, where=where)
    np.testing.assert_allclose(d, d_sq, rtol=1e-5)
    assert i.tolist() == i_sq.tolist()
    _, i = _build(data, "HNSW16_PQ4").search(data[2], K, ef_search=256, where=where)
    assert np.isin(i[i >= 0], where["id"]).all()
