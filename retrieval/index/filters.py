"""Filtered search: the items a ``where`` filter keeps, and the FAISS ``IDSelector`` of them.

The filter language is deliberately small. A filter is a mapping ``{field: value or list of
values}``; an item matches when, for every field, its value is one of the values given (AND
across fields, OR within one field's list). The fields (:data:`FIELDS`):

- ``label``: the class name (``label=Sneaker``);
- ``id``: the item id (``id=3,17``);
- ``ref``: the reference exactly as stored: the absolute image path or
  ``fashion-mnist:SPLIT:N``;
- ``sha256``: the content hash of the image file (hex SHA-256), to find a file by content;
- any user field the index holds (the extra columns of the CSV manifest it was built from,
  e.g. ``color=red``).

Written as text (``retrieval search --where``, the server's ``where`` form field) a condition is
``FIELD=VALUE`` or ``FIELD=V1,V2`` (a list); several conditions are ANDed (the same field given
twice keeps the values both allow). A value holding a comma is written as a JSON object
instead: ``{"label": ["a,b", "c"]}``. Unknown fields and unknown labels are errors that name the
valid ones: a misspelt label would otherwise silently return nothing.

The matching ids come from one SQL query on the index's metadata store
(:mod:`retrieval.index.store`), which reads the rows its indexes point to, not every item.
The search itself is filtered inside FAISS (:func:`id_selector`): the index visits only ids the
selector accepts, so ``k`` matching items come back whatever their share of the gallery, with
no over-fetching. Removed items (HNSW tombstones) are never live items, so the selector of a
filter excludes them too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from retrieval.errors import UserError

if TYPE_CHECKING:
    import faiss

    from retrieval.index.gallery import GalleryIndex

#: The fields every index can filter on (user fields come on top).
FIELDS = ("label", "id", "ref", "sha256")

#: A filter: field -> value or list of values.
Where = Mapping[str, object]

#: Labels named in an "unknown label" message, at most.
_SHOWN_LABELS = 20


def parse_where(conditions: Sequence[str]) -> dict[str, list[str]]:
    """The filter of textual conditions (``label=Sneaker``, ``id=1,2``, or a JSON object),
    ANDed; ``{}`` for none.

    Raises:
        UserError: a condition that is neither ``FIELD=VALUE`` nor a JSON object of fields to
            values.

    Example:
        >>> parse_where(["label=Sneaker,Sandal", "label=Sandal,Boot"])
        {'label': ['Sandal']}
    """
    out: dict[str, list[str]] = {}
    for text in conditions:
        text = text.strip()
        if text.startswith("{"):
            try:
                doc = json.loads(text)
            except ValueError:
                doc = None
            if not isinstance(doc, dict):
                raise UserError(f"where: {text[:80]!r} is not a JSON object of fields to values")
            parsed = {str(f): [str(v) for v in _as_list(vals)] for f, vals in doc.items()}
        else:
            field, sep, value = text.partition("=")
            values = [v.strip() for v in value.split(",")]
            if not sep or not field.strip() or not all(values):
                raise UserError(
                    f"where: {text[:80]!r} is not FIELD=VALUE[,VALUE...] (e.g. label=Sneaker); "
                    f"the fields: {', '.join(FIELDS)}"
                )
            parsed = {field.strip(): values}
        for field, values in parsed.items():
            if field in out:  # AND of two lists of the same field: the values both allow
                out[field] = [v for v in out[field] if v in values]
            else:
                out[field] = list(dict.fromkeys(values))
    return out


def freeze(where: Where | None) -> tuple | None:
    """A hashable, order-independent form of a filter (``None`` for no filter), to group
    searches with the same filter."""
    if not where:
        return None
    return tuple(sorted((str(f), tuple(sorted(map(str, _as_list(v))))) for f, v in where.items()))


def thaw(frozen: tuple | None) -> dict[str, list[str]] | None:
    """The filter :func:`freeze` was given (values as strings)."""
    return None if frozen is None else {f: list(v) for f, v in frozen}


def matching_ids(index: GalleryIndex, where: Where) -> np.ndarray:
    """Ids ``(m,)`` of the live items of ``index`` that match ``where``, ascending: the filter
    is checked here, then run as one SQL query on the index's store, by its indexes
    (:meth:`retrieval.index.store.MetadataStore.matching_ids`).

    Raises:
        UserError: an unknown field, an unknown label, or an id that is not a whole number.
    """
    unknown = [f for f in where if f not in FIELDS and not index.store.has_field(f)]
    if unknown:
        names = list(dict.fromkeys([*FIELDS, *index.store.field_names()]))
        raise UserError(f"cannot filter on {unknown[0]!r}; the fields are: {', '.join(names)}")
    query: dict[str, list] = {}
    for field, given in where.items():
        values = _as_list(given)
        if field == "label":
            known = set(index.class_names)
            missing = [str(v) for v in values if str(v) not in known]
            if missing:
                shown = ", ".join(index.class_names[:_SHOWN_LABELS])
                more = " ..." if len(index.class_names) > _SHOWN_LABELS else ""
                raise UserError(f"no label {missing[0]!r} in this index; its labels: {shown}{more}")
            query[field] = [str(v) for v in values]
        elif field == "id":
            try:
                query[field] = [int(str(v)) for v in values]
            except ValueError:
                raise UserError(f"where: id takes whole numbers, got {values!r}") from None
        else:  # ref, sha256, a user field
            query[field] = [str(v) for v in values]
    return index.matching_ids(query)


def id_selector(ids: np.ndarray, bound: int) -> faiss.IDSelector:
    """A FAISS selector accepting exactly ``ids`` (each ``0 <= id < bound``).

    A bitmap (``IDSelectorBitmap``, one bit per id ever given: 125 KB per million), rather
    than ``IDSelectorBatch``'s hash set: a membership test is one bit, and a filter keeping
    most of a large gallery costs no more than one keeping a few items.
    """
    import faiss

    bits = np.zeros(max(1, bound), dtype=bool)
    bits[np.asarray(ids, dtype=np.int64)] = True
    return faiss.IDSelectorBitmap(np.packbits(bits, bitorder="little"))


def _as_list(values: object) -> list:
    if isinstance(values, list | tuple | set | frozenset | np.ndarray):
        return list(values)
    return [values]
