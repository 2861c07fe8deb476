"""Index types: factory strings FAISS would abort on are refused before FAISS sees them."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.errors import UserError
from retrieval.index.factory import check_index_type, make_index
from retrieval.index.gallery import GalleryIndex


@pytest.mark.parametrize(
    "index_type",
    ["HNSW0", "HNSW1", "IVF0,Flat", "PQ4x0", "PQ4x17", "OPQ0,PQ4", "NSG0", "IVF4_HNSW0,Flat"],
)
def test_factory_parameters_faiss_aborts_on_are_refused(index_type):
    with pytest.raises(UserError, match="index type") as err:
        make_index(index_type, 16, "cosine")
    assert len(str(err.value).splitlines()) == 1
    xb = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    with pytest.raises(UserError):
        GalleryIndex.build(xb, ["r"] * 300, np.zeros(300), ["a"], index_type=index_type)


@pytest.mark.parametrize(
    "index_type", ["Flat", "HNSW2", "HNSW32", "IVF1024,Flat", "OPQ16,IVF1024,PQ16", "PQ8x8", "SQ8"]
)
def test_valid_factory_strings_pass(index_type):
    check_index_type(index_type)
