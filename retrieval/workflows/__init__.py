"""What each command of ``retrieval`` does, as library functions: embed a source, build, change
and search an index, evaluate a model on a source.

Each composes the pieces of :mod:`retrieval.model`, :mod:`retrieval.index` and
:mod:`retrieval.evaluation` for one task, so that the command line only parses options, calls one
of these, and renders the result. Long work reports progress through a
:data:`ProgressFactory` (the command line passes one that draws a bar); the library itself only
logs.
"""

from retrieval.workflows._common import ProgressFactory, embed, open_images
from retrieval.workflows.decisions import (
    calibrate_index,
    cutpoint_of,
    decide,
    find_duplicates_in,
)
from retrieval.workflows.evaluate import (
    PROTOCOLS,
    EvaluationRun,
    default_eval_classes,
    detect_protocol,
    evaluate_source,
)
from retrieval.workflows.export import export_model
from retrieval.workflows.gallery import (
    BuildSpec,
    add_to_index,
    build_index,
    check_index_out,
    compact_index,
    embed_shard_of_source,
    embed_to_file,
    index_info,
    remove_from_index,
    repair_index,
    sync_index,
)
from retrieval.workflows.search import QueryResult, expand_queries, read_query, search_index

__all__ = [
    "PROTOCOLS",
    "BuildSpec",
    "EvaluationRun",
    "ProgressFactory",
    "QueryResult",
    "add_to_index",
    "build_index",
    "calibrate_index",
    "check_index_out",
    "compact_index",
    "cutpoint_of",
    "decide",
    "default_eval_classes",
    "detect_protocol",
    "embed",
    "embed_shard_of_source",
    "embed_to_file",
    "evaluate_source",
    "expand_queries",
    "export_model",
    "find_duplicates_in",
    "index_info",
    "open_images",
    "read_query",
    "remove_from_index",
    "repair_index",
    "search_index",
    "sync_index",
]
