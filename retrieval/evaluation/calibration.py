"""Match or no match: a distance cut-point chosen on labelled queries, and the decision it makes.

A nearest-neighbour search always answers, even when nothing in the gallery is the same thing.
Calibration turns the ranking into a decision: labelled queries are searched against the
gallery, every distinct nearest-neighbour distance is tried as a threshold, and cut-points are
chosen on the resulting precision / recall curve — the best F1, and one per precision or recall
target. :func:`match` then labels a query with its nearest neighbour's label when that
neighbour is within the cut-point, and ``"no match"`` otherwise.

Outcomes, as TensorFlow Similarity's ``calibrate`` counts them with its ``match_nearest``
matcher: the *predicted label* of a query is the label of its nearest gallery item, and the
query is *accepted* at threshold :math:`t` when that item's distance :math:`d \\le t`.

============  ==================================  =========================================
              accepted (:math:`d \\le t`)           rejected (:math:`d > t`, "no match")
============  ==================================  =========================================
right label   true positive (TP)                  false negative (FN)
wrong label   false positive (FP)                 true negative (TN)
============  ==================================  =========================================

A query whose class is absent from the gallery (an *open-set* query) can never have the right
label: it is a false positive when accepted and a true negative when it comes out "no match".

Distances: lower is closer. For ``cosine`` indexes the distance is :math:`1 - \\cos` (the
inner product of unit vectors subtracted from 1, in [0, 2]); for ``l2`` the Euclidean
distance. :func:`to_distance` converts a search's scores.

The functions (:func:`nearest_outcome`, :func:`sweep`, :func:`choose_cutpoints`,
:func:`classification_at`, :func:`match`; :func:`nearest` and :func:`decision_at` search
embeddings with FAISS) take numpy arrays and touch no file; the :class:`Calibration` record is
what an index folder stores (``calibration.json``, written atomically, nothing else touched).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from retrieval.atomic import write_json
from retrieval.errors import UserError
from retrieval.index.manifest import CALIBRATION_FILE  # noqa: F401 (the file's name, kept there)

logger = logging.getLogger(__name__)

#: The label :func:`match` gives a query whose nearest neighbour is past the cut-point.
NO_MATCH = "no match"
#: Version of the ``calibration.json`` format; a newer file is refused, not misread.
CALIBRATION_VERSION = 1
#: Name of the cut-point with the best F1 (the default of :meth:`Calibration.cutpoint`).
BEST_F1 = "best_f1"
#: Points of the precision / recall curve kept in the record (for the pictures).
CURVE_POINTS = 512
#: Metrics whose distance the record describes.
METRICS = ("cosine", "l2")
#: Slack when comparing a measured rate with a target (rates are ratios of counts).
_TARGET_SLACK = 1e-12


def to_distance(scores: np.ndarray, metric: str, similarity: bool) -> np.ndarray:
    r"""Distances (lower is closer) from a search's scores, float64.

    .. math::
        d = \begin{cases} 1 - s & \text{cosine similarity } s \\ s & \text{otherwise} \end{cases}

    Args:
        scores: what the search returned, any shape.
        metric: ``cosine`` or ``l2``.
        similarity: whether ``scores`` are similarities (higher is closer: a cosine index that
            returns inner products) rather than distances.

    Example:
        >>> to_distance(np.array([1.0, 0.25]), "cosine", similarity=True).tolist()
        [0.0, 0.75]
        >>> to_distance(np.array([0.5]), "l2", similarity=False).tolist()
        [0.5]
    """
    _check_metric(metric)
    scores = np.asarray(scores, dtype=np.float64)
    if similarity:
        if metric != "cosine":
            raise ValueError("only cosine scores are similarities; l2 scores are distances")
        return 1.0 - scores
    return scores


def nearest_outcome(
    distances: np.ndarray,
    ids: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's nearest distance and whether its nearest neighbour has its label.

    Labels are compared by value, so class *names* work across a query set and a gallery that
    number their classes differently; a query whose class the gallery lacks is never correct.

    Args:
        distances: ``(nq, k)`` or ``(nq,)`` distances, best first (see :func:`to_distance`).
        ids: same shape, row positions into ``gallery_labels``; -1 = no neighbour.
        query_labels: ``(nq,)``.
        gallery_labels: ``(nb,)``, indexed by ``ids``.

    Returns:
        ``(d, correct)``: float64 ``(nq,)`` (``inf`` when a query has no neighbour) and bool
        ``(nq,)``.

    Example:
        >>> d, ok = nearest_outcome(np.array([[0.1], [0.4]]), np.array([[1], [0]]),
        ...                         np.array(["cat", "owl"]), np.array(["dog", "cat"]))
        >>> d.tolist(), ok.tolist()
        ([0.1, 0.4], [True, False])
    """
    d = np.asarray(distances, dtype=np.float64)
    i = np.asarray(ids, dtype=np.int64)
    if d.ndim == 2:
        d, i = (d[:, 0], i[:, 0]) if d.shape[1] else (np.full(len(d), np.inf), np.full(len(d), -1))
    if d.shape != i.shape or len(d) != len(query_labels):
        raise ValueError("distances, ids and query_labels must describe the same queries")
    gallery_labels = np.asarray(gallery_labels)
    found = i >= 0
    correct = np.zeros(len(d), dtype=bool)
    correct[found] = gallery_labels[i[found]] == np.asarray(query_labels)[found]
    return np.where(found, d, np.inf), correct


def nearest(
    xq: np.ndarray,
    xb: np.ndarray | None = None,
    metric: str = "cosine",
    self_index: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest gallery item of each query, never the query itself: ``(d, i)``.

    The exact search (:func:`retrieval.index.knn.knn`), its scores turned into
    distances (lower is closer: ``1 - cos``, or the Euclidean distance).

    Args:
        xq: queries ``(nq, dim)``.
        xb: gallery ``(nb, dim)``; None = leave-one-out on ``xq``.
        metric: ``cosine`` or ``l2``.
        self_index: gallery position of each query (-1 = not in the gallery), ``(nq,)``.

    Returns:
        float64 distances ``(nq,)`` and int64 gallery positions ``(nq,)``.

    Example:
        >>> d, i = nearest(np.array([[0.0], [1.0], [3.0]], np.float32), metric="l2")
        >>> d.tolist(), i.tolist()
        ([1.0, 1.0, 2.0], [1, 0, 1])
    """
    from retrieval.index.knn import knn

    _check_metric(metric)
    if xb is None:
        xb, self_index = xq, np.arange(len(xq))
    d, i = knn(xq, xb, 1, metric, self_index=self_index)
    d = d[:, 0].astype(np.float64)
    d = 1.0 - d if metric == "cosine" else np.sqrt(np.maximum(d, 0.0))  # knn: sim / squared
    return np.maximum(d, 0.0), i[:, 0].astype(np.int64)


def decision_at(
    xq: np.ndarray,
    yq: np.ndarray,
    threshold: float,
    xb: np.ndarray | None = None,
    yb: np.ndarray | None = None,
    metric: str = "cosine",
    self_index: np.ndarray | None = None,
) -> dict[str, float]:
    """The classification-at-threshold figures of embeddings (for ``retrieval evaluate``).

    Each query's nearest gallery item (:func:`nearest`) decides its label, or "no match" past
    ``threshold``; :func:`classification_at` counts the outcomes. Queries whose label no
    gallery item has are the open set: they should all come out "no match".

    Args:
        xq, yq: query embeddings ``(nq, dim)`` and labels ``(nq,)`` (names or numbers, compared
            by value with ``yb``).
        threshold: the cut-point distance.
        xb, yb: the gallery; None = leave-one-out on the queries.
        metric, self_index: see :func:`nearest`.

    Example:
        >>> x = np.array([[0.0], [0.1], [5.0], [5.2], [20.0]], np.float32)
        >>> r = decision_at(x, np.array(["a", "a", "b", "b", "c"]), 0.5, metric="l2")
        >>> r["precision"], r["recall"], r["open_set_no_match"]
        (1.0, 1.0, 1.0)
    """
    yq = np.asarray(yq)
    yb = yq if xb is None else np.asarray(yb)
    if xb is None:
        # leave-one-out: a query is open-set when no *other* item has its label
        values, counts = np.unique(yq, return_counts=True)
        open_set = np.isin(yq, values[counts == 1])
    else:
        open_set = ~np.isin(yq, yb)
    d, i = nearest(xq, xb, metric, self_index)
    dist, correct = nearest_outcome(d, i, yq, yb)
    return classification_at(dist, correct, threshold, open_set)


# ---------------------------------------------------------------------------------- sweep


@dataclass(frozen=True)
class Sweep:
    """Counts and rates at every threshold, arrays of shape ``(n_thresholds,)`` (ascending
    thresholds); ``positives`` = queries whose nearest neighbour has their label, ``negatives``
    = the others, ``queries`` = both."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    fpr: np.ndarray
    positives: int
    negatives: int

    @property
    def queries(self) -> int:
        return self.positives + self.negatives

    @property
    def matched(self) -> np.ndarray:
        """Queries accepted at each threshold (TP + FP)."""
        return self.tp + self.fp

    def at(self, j: int) -> dict[str, float]:
        """Everything measured at threshold number ``j``."""
        return {
            "distance": float(self.thresholds[j]),
            "precision": float(self.precision[j]),
            "recall": float(self.recall[j]),
            "f1": float(self.f1[j]),
            "fpr": float(self.fpr[j]),
            "matched": int(self.matched[j]),
            "queries": self.queries,
        }


def _rates(
    tp: np.ndarray, fp: np.ndarray, positives: int, negatives: int
) -> tuple[np.ndarray, ...]:
    tp = tp.astype(np.float64)
    fp = fp.astype(np.float64)
    accepted = tp + fp
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(accepted > 0, tp / np.maximum(accepted, 1), 1.0)
        recall = tp / positives if positives else np.zeros_like(tp)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
        fpr = fp / negatives if negatives else np.zeros_like(fp)
    return precision, recall, f1, fpr


def _check_outcomes(distances: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    ok = np.asarray(correct, dtype=bool).reshape(-1)
    if d.shape != ok.shape:
        raise ValueError(f"{len(d)} distances but {len(ok)} correct flags")
    if np.isnan(d).any():
        raise ValueError("distances contain NaN")
    return d, ok


def sweep(distances: np.ndarray, correct: np.ndarray) -> Sweep:
    r"""Precision, recall, F1 and false-positive rate with every distinct distance as threshold.

    With :math:`d_i` query :math:`i`'s nearest distance, :math:`c_i` whether that neighbour has
    its label, and a query accepted at threshold :math:`t` when :math:`d_i \le t`:

    .. math::
        \mathrm{TP}(t) &= \#\{i : c_i \wedge d_i \le t\} \qquad
        \mathrm{FP}(t) = \#\{i : \neg c_i \wedge d_i \le t\} \\
        \mathrm{FN}(t) &= \#\{i : c_i \wedge d_i > t\} \qquad
        \mathrm{TN}(t) = \#\{i : \neg c_i \wedge d_i > t\} \\
        \mathrm{precision} &= \frac{\mathrm{TP}}{\mathrm{TP} + \mathrm{FP}} \qquad
        \mathrm{recall} = \frac{\mathrm{TP}}{\mathrm{TP} + \mathrm{FN}} \\
        F_1 &= \frac{2\,\mathrm{precision}\cdot\mathrm{recall}}
                    {\mathrm{precision} + \mathrm{recall}} \qquad
        \mathrm{FPR} = \frac{\mathrm{FP}}{\mathrm{FP} + \mathrm{TN}}

    Empty ratios: precision is 1 when nothing is accepted (no wrong answer was given), recall 0
    when no query can be right, FPR 0 when every query can, F1 0 when precision and recall are.
    Recall and FPR never decrease as :math:`t` grows; precision may move either way.

    One sort, then cumulative counts: :math:`O(n \log n)` for :math:`n` queries.

    Args:
        distances: nearest-neighbour distance of each query, ``(nq,)``; ``inf`` = no neighbour
            (never accepted at a finite threshold, and not a threshold itself).
        correct: whether each query's nearest neighbour has its label, ``(nq,)`` bool; False
            for every query whose class is absent from the gallery.

    References:
        TensorFlow Similarity, ``SimilarityModel.calibrate`` and the ``match_nearest``
        classification matcher (the same counts).

    Relations:
        :func:`classification_at` gives the same figures at one given threshold.

    Example:
        >>> s = sweep(np.array([0.1, 0.2, 0.2, 0.5]), np.array([True, True, False, False]))
        >>> s.thresholds.tolist(), s.tp.tolist(), s.fp.tolist()
        ([0.1, 0.2, 0.5], [1, 2, 2], [0, 1, 2])
        >>> [round(float(v), 3) for v in s.f1]
        [0.667, 0.8, 0.667]
    """
    d, ok = _check_outcomes(distances, correct)
    finite = np.isfinite(d)
    order = np.argsort(d, kind="stable")
    d_sorted = d[order]
    tp_cum = np.cumsum(ok[order])
    fp_cum = np.cumsum(~ok[order])
    thresholds = np.unique(d[finite])
    # queries accepted at each threshold: all with d <= t (the last of a run of equal distances)
    last = np.searchsorted(d_sorted, thresholds, side="right") - 1
    tp = tp_cum[last] if len(last) else np.zeros(0, np.int64)
    fp = fp_cum[last] if len(last) else np.zeros(0, np.int64)
    positives, negatives = int(ok.sum()), int((~ok).sum())
    precision, recall, f1, fpr = _rates(tp, fp, positives, negatives)
    return Sweep(thresholds, tp, fp, precision, recall, f1, fpr, positives, negatives)


def classification_at(
    distances: np.ndarray,
    correct: np.ndarray,
    threshold: float,
    open_set: np.ndarray | None = None,
) -> dict[str, float]:
    """Precision, recall, F1 and false-positive rate at one cut-point (see :func:`sweep`).

    For ``retrieval evaluate``: how the decision would do on labelled queries, including
    open-set ones.

    Args:
        distances, correct: as for :func:`sweep`.
        threshold: the cut-point distance; a query is accepted when ``d <= threshold``.
        open_set: which queries' classes are absent from the gallery, ``(nq,)`` bool; adds
            ``open_set_queries`` and ``open_set_no_match`` (the fraction of them that came out
            "no match" — 1 is perfect).

    Returns:
        ``distance``, ``precision``, ``recall``, ``f1``, ``fpr``, ``tp``, ``fp``, ``fn``,
        ``tn``, ``matched``, ``queries`` (and the open-set figures).

    Example:
        >>> r = classification_at(np.array([0.1, 0.3, 0.2]), np.array([True, True, False]), 0.2,
        ...                       open_set=np.array([False, False, True]))
        >>> r["precision"], r["recall"], r["fpr"], r["open_set_no_match"]
        (0.5, 0.5, 1.0, 0.0)
    """
    d, ok = _check_outcomes(distances, correct)
    accepted = d <= threshold
    tp, fp = int((ok & accepted).sum()), int((~ok & accepted).sum())
    positives, negatives = int(ok.sum()), int((~ok).sum())
    precision, recall, f1, fpr = (
        float(v[0]) for v in _rates(np.array([tp]), np.array([fp]), positives, negatives)
    )
    out: dict[str, float] = {
        "distance": float(threshold),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "fpr": fpr,
        "tp": tp,
        "fp": fp,
        "fn": positives - tp,
        "tn": negatives - fp,
        "matched": tp + fp,
        "queries": len(d),
    }
    if open_set is not None:
        open_set = np.asarray(open_set, dtype=bool).reshape(-1)
        if open_set.shape != d.shape:
            raise ValueError(f"{len(d)} distances but {len(open_set)} open-set flags")
        n_open = int(open_set.sum())
        out["open_set_queries"] = n_open
        out["open_set_no_match"] = float((~accepted[open_set]).mean()) if n_open else 1.0
    return out


# ----------------------------------------------------------------------------- cut-points


@dataclass(frozen=True)
class Cutpoint:
    """A named distance cut-point and what it measured on the calibration queries."""

    name: str
    distance: float
    precision: float
    recall: float
    f1: float
    fpr: float
    #: queries accepted (a label, not "no match") on the calibration queries
    matched: int
    #: calibration queries
    queries: int


def _target_name(kind: str, value: float) -> str:
    return f"{kind}_{value:g}"


def _check_targets(kind: str, targets: Sequence[float]) -> None:
    for t in targets:
        if not 0.0 < t <= 1.0:
            raise UserError(f"a target {kind} is a fraction in (0, 1], got {t}")


def choose_cutpoints(
    s: Sweep,
    target_precision: Sequence[float] = (),
    target_recall: Sequence[float] = (),
) -> tuple[dict[str, Cutpoint], list[str]]:
    r"""The best-F1 cut-point and one per target, chosen on a :class:`Sweep`.

    .. math::
        t_{F_1} &= \max \operatorname*{arg\,max}_t F_1(t) \\
        t_{P \ge p} &= \max\,\{t : \mathrm{precision}(t) \ge p\} \\
        t_{R \ge r} &= \min\,\{t : \mathrm{recall}(t) \ge r\}

    As TensorFlow Similarity does, among equal values the largest distance wins (it accepts
    more). Recall never decreases with :math:`t`, so the largest threshold meeting a precision
    target has the highest recall among those meeting it; false positives never decrease with
    :math:`t`, so the smallest threshold meeting a recall target has the fewest.

    Args:
        s: the sweep.
        target_precision, target_recall: fractions in (0, 1]; cut-points are named
            ``precision_0.95``, ``recall_0.9``.

    Returns:
        ``(cutpoints, unmet)``: cut-points by name (``best_f1`` first), and the names of targets
        no threshold meets.

    Example:
        >>> s = sweep(np.array([0.1, 0.2, 0.3, 0.4]), np.array([True, True, False, True]))
        >>> cps, unmet = choose_cutpoints(s, target_precision=[1.0], target_recall=[1.0])
        >>> {n: c.distance for n, c in cps.items()}
        {'best_f1': 0.4, 'precision_1': 0.2, 'recall_1': 0.4}
    """
    _check_targets("precision", target_precision)
    _check_targets("recall", target_recall)
    cutpoints: dict[str, Cutpoint] = {}
    unmet: list[str] = []
    if len(s.thresholds) == 0:
        return cutpoints, [BEST_F1, *(_target_name("precision", p) for p in target_precision)] + [
            _target_name("recall", r) for r in target_recall
        ]

    def make(name: str, j: int) -> Cutpoint:
        return Cutpoint(name=name, **s.at(j))

    best = int(np.flatnonzero(s.f1 == s.f1.max())[-1])
    cutpoints[BEST_F1] = make(BEST_F1, best)
    for p in target_precision:
        name = _target_name("precision", p)
        meets = np.flatnonzero(s.precision >= p - _TARGET_SLACK)
        if len(meets):
            cutpoints[name] = make(name, int(meets[-1]))
        else:
            unmet.append(name)
    for r in target_recall:
        name = _target_name("recall", r)
        meets = np.flatnonzero(s.recall >= r - _TARGET_SLACK)
        if len(meets):
            cutpoints[name] = make(name, int(meets[0]))
        else:
            unmet.append(name)
    return cutpoints, unmet


# ---------------------------------------------------------------------------------- match


def match(
    distances: np.ndarray,
    labels: Sequence[str | None],
    cutpoint: Cutpoint | float,
) -> list[str]:
    """Each query's decision: its nearest neighbour's label, or :data:`NO_MATCH` past the
    cut-point.

    Args:
        distances: nearest-neighbour distance of each query, ``(nq,)`` (lower is closer; see
            :func:`to_distance`); ``inf`` or NaN = no neighbour.
        labels: the nearest neighbour's label name of each query (None = no neighbour).
        cutpoint: a :class:`Cutpoint` or a distance; accepted when ``d <= cutpoint``.

    Example:
        >>> match(np.array([0.1, 0.5, np.inf]), ["cat", "dog", None], 0.3)
        ['cat', 'no match', 'no match']
    """
    t = cutpoint.distance if isinstance(cutpoint, Cutpoint) else float(cutpoint)
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    if len(d) != len(labels):
        raise ValueError(f"{len(d)} distances but {len(labels)} labels")
    return [
        str(lab) if lab is not None and np.isfinite(x) and x <= t else NO_MATCH
        for x, lab in zip(d, labels, strict=True)
    ]


# ----------------------------------------------------------------------------- the record


@dataclass
class Calibration:
    """Cut-points chosen on labelled queries, as stored in an index folder.

    ``curve`` keeps up to :data:`CURVE_POINTS` points of the sweep (``distance``,
    ``precision``, ``recall``, ``f1``, ``fpr``) for the pictures; ``unmet`` names the targets
    no threshold met.
    """

    metric: str
    cutpoints: dict[str, Cutpoint]
    queries: int
    open_set_queries: int
    unmet: list[str] = field(default_factory=list)
    curve: dict[str, list[float]] = field(default_factory=dict)
    created: str = ""
    version: int = CALIBRATION_VERSION

    def cutpoint(self, name: str | None = None) -> Cutpoint:
        """The cut-point called ``name`` (default :data:`BEST_F1`).

        Raises:
            UserError: no such cut-point (the message lists them).
        """
        name = name or BEST_F1
        if name not in self.cutpoints:
            known = ", ".join(self.cutpoints) or "none"
            raise UserError(f"no cut-point {name!r} in this calibration; it has: {known}")
        return self.cutpoints[name]

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "metric": self.metric,
            "distance": "1 - cosine similarity" if self.metric == "cosine" else "euclidean",
            "created": self.created,
            "queries": self.queries,
            "open_set_queries": self.open_set_queries,
            "cutpoints": {n: asdict(c) for n, c in self.cutpoints.items()},
            "unmet": list(self.unmet),
            "curve": self.curve,
        }

    @classmethod
    def from_json(cls, doc: dict, source: str = "the calibration") -> Calibration:
        """Read a record written by :meth:`to_json`.

        Raises:
            UserError: a newer format, or fields missing or of the wrong kind.
        """
        if not isinstance(doc, dict):
            raise UserError(f"{source} is not a calibration record; run `retrieval calibrate`")
        version = doc.get("version")
        if not isinstance(version, int):
            raise UserError(f"{source} has no format version; run `retrieval calibrate` again")
        if version > CALIBRATION_VERSION:
            raise UserError(
                f"{source} was written by a newer metric-retrieval (format {version}); upgrade"
            )
        try:
            cutpoints = {
                str(n): Cutpoint(
                    name=str(c["name"]),
                    distance=float(c["distance"]),
                    precision=float(c["precision"]),
                    recall=float(c["recall"]),
                    f1=float(c["f1"]),
                    fpr=float(c["fpr"]),
                    matched=int(c["matched"]),
                    queries=int(c["queries"]),
                )
                for n, c in doc["cutpoints"].items()
            }
            return cls(
                metric=str(doc["metric"]),
                cutpoints=cutpoints,
                queries=int(doc["queries"]),
                open_set_queries=int(doc["open_set_queries"]),
                unmet=[str(u) for u in doc.get("unmet", [])],
                curve={str(k): [float(x) for x in v] for k, v in doc.get("curve", {}).items()},
                created=str(doc.get("created", "")),
                version=version,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(
                f"{source} is damaged ({type(exc).__name__}: {exc}); run `retrieval calibrate` "
                "again"
            ) from None

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``calibration.json`` into ``folder`` atomically; nothing else there changes."""
        path = Path(folder) / CALIBRATION_FILE
        write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Calibration:
        """Read ``folder/calibration.json``.

        Raises:
            UserError: the folder is not calibrated, or the file is unreadable.
        """
        path = Path(folder) / CALIBRATION_FILE
        if not path.is_file():
            raise UserError(
                f"{folder} has no calibration; run `retrieval calibrate {folder} LABELLED_SOURCE`"
            )
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(
                f"{path} is unreadable ({exc}); run `retrieval calibrate` again"
            ) from None
        return cls.from_json(doc, str(path))


def is_calibrated(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a calibration (not whether it is readable)."""
    return (Path(folder) / CALIBRATION_FILE).is_file()


def _curve(s: Sweep, keep: Sequence[float]) -> dict[str, list[float]]:
    """At most :data:`CURVE_POINTS` evenly spread points of ``s``, plus the cut-points."""
    n = len(s.thresholds)
    picks = set(np.linspace(0, n - 1, min(n, CURVE_POINTS)).round().astype(int).tolist())
    picks |= set(np.searchsorted(s.thresholds, keep).clip(0, max(n - 1, 0)).tolist())
    j = np.array(sorted(picks), dtype=np.int64) if n else np.zeros(0, np.int64)
    return {
        "distance": s.thresholds[j].tolist(),
        "precision": s.precision[j].tolist(),
        "recall": s.recall[j].tolist(),
        "f1": s.f1[j].tolist(),
        "fpr": s.fpr[j].tolist(),
    }


def calibrate(
    distances: np.ndarray,
    correct: np.ndarray,
    metric: str,
    target_precision: Sequence[float] = (),
    target_recall: Sequence[float] = (),
    open_set: np.ndarray | None = None,
) -> Calibration:
    """Sweep every distinct nearest-neighbour distance and choose the cut-points.

    Args:
        distances, correct: as for :func:`sweep` (from :func:`nearest_outcome`).
        metric: the index's metric, ``cosine`` or ``l2`` (what the distances mean).
        target_precision, target_recall: see :func:`choose_cutpoints`.
        open_set: which queries' classes are absent from the gallery (counted in the record).

    Raises:
        UserError: no query has a neighbour, or a target is not in (0, 1].

    Example:
        >>> cal = calibrate(np.array([0.1, 0.2, 0.6]), np.array([True, True, False]), "cosine",
        ...                 target_precision=[0.9])
        >>> cal.cutpoint().distance, cal.cutpoint("precision_0.9").recall
        (0.2, 1.0)
    """
    _check_metric(metric)
    s = sweep(distances, correct)
    if len(s.thresholds) == 0:
        raise UserError("no calibration query found a neighbour: is the index empty?")
    if s.positives == 0:
        logger.warning(
            "no calibration query's nearest neighbour has its label: every cut-point has "
            "recall 0; do the query labels name the gallery's classes?"
        )
    cutpoints, unmet = choose_cutpoints(s, target_precision, target_recall)
    for name in unmet:
        logger.warning("no threshold meets the target %s on these queries", name)
    n_open = int(np.asarray(open_set, dtype=bool).sum()) if open_set is not None else 0
    return Calibration(
        metric=metric,
        cutpoints=cutpoints,
        queries=s.queries,
        open_set_queries=n_open,
        unmet=unmet,
        curve=_curve(s, [c.distance for c in cutpoints.values()]),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def describe(cal: Calibration) -> list[dict[str, float | str]]:
    """One row per cut-point (name, distance, precision, recall, F1, FPR, matched/queries),
    for a table on the command line."""
    return [
        {
            "cut-point": c.name,
            "distance": round(c.distance, 6),
            "precision": round(c.precision, 4),
            "recall": round(c.recall, 4),
            "f1": round(c.f1, 4),
            "fpr": round(c.fpr, 4),
            "matched": f"{c.matched}/{c.queries}",
        }
        for c in cal.cutpoints.values()
    ]
