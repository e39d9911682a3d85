"""Hub images: training images that rank high for many queries they have nothing to do with.

Some training images rise after unlearning almost any query and crowd the top of unrelated rankings.
From a run's scores [Q, N] and each query's relevant ids (the retrieval ground truth), this module
counts, per training image, in how many queries' top K it appears *without being relevant to that
query* (an image relevant to a query never counts for that query). The hub images are those with an
irrelevant count of at least `min_queries`:

- an integer >= 1 is a number of queries (default 2: an image that turns up, wrongly, in the top K
  of two different queries);
- a number strictly between 0 and 1 is a fraction of the queries evaluated, rounded up
  (0.25 of 8 queries -> 2).

The headline is the **hub share**: of all Q·K top-K slots, the share held by hub images where they
are not relevant (the number to halve). It equals the mean over queries of the share of each query's
top K held by hubs, so it also comes with a standard error over the queries. Alongside: the share of
top-K slots held by any irrelevant image (1 - P@K), the histogram of how many queries each image
appears in irrelevantly, and the top hubs (id, file, count, the queries, the image's metadata such as
its concept).

Top K: the K highest finite scores of a query, ties broken by the lower id (NaN/unscored ids are
never in a top K, so a query with fewer than K scored ids has fewer slots).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.evaluation import report
from diffusion_attribution.evaluation.retrieval import RetrievalResult

DEFAULT_TOP_K = 10
DEFAULT_MIN_QUERIES = 2
DEFAULT_LIST_SIZE = 20


def resolve_min_queries(min_queries: float, num_queries: int) -> int:
    """The hub threshold as a number of queries (see the module docstring)."""
    value = float(min_queries)
    if 0 < value < 1:
        return max(1, math.ceil(value * num_queries - 1e-9))
    if value >= 1 and value == int(value):
        return int(value)
    raise ValueError(
        f"benchmark.hub_min_queries={min_queries!r}: give a number of queries (an integer >= 1) or a "
        "fraction of the queries strictly between 0 and 1."
    )


def top_k_ids(scores: np.ndarray, k: int) -> list[np.ndarray]:
    """Per query, the ids of the k highest finite scores, best first (ties: lower id first)."""
    tops = []
    for row in np.asarray(scores, dtype=np.float64):
        finite = np.flatnonzero(np.isfinite(row))
        order = finite[np.argsort(-row[finite], kind="stable")]
        tops.append(order[:k])
    return tops


@dataclass
class Hubness:
    """The hub diagnostic of one run (see the module docstring)."""

    top_k: int
    min_queries: int  # resolved to a number of queries
    num_queries: int
    num_train: int
    counts: np.ndarray  # [N] in how many queries' top K each image appears irrelevantly
    queries_of: dict[int, list[int]]  # image id -> the queries (their indices) where it counts
    slots: np.ndarray  # [Q] top-K slots per query (K, or fewer scored ids)
    hub_slots: np.ndarray  # [Q] slots held irrelevantly by hub images
    irrelevant_slots: np.ndarray  # [Q] slots held by any irrelevant image
    query_ids: list[int] = field(default_factory=list)  # the evaluated queries' indices in the run

    @property
    def hubs(self) -> np.ndarray:
        """Hub image ids, most queries first (then by id)."""
        ids = np.flatnonzero(self.counts >= self.min_queries)
        return ids[np.lexsort((ids, -self.counts[ids]))]

    @property
    def hub_share(self) -> float:
        total = int(self.slots.sum())
        return float(self.hub_slots.sum() / total) if total else math.nan

    @property
    def hub_share_sem(self) -> float:
        per_query = [h / s for h, s in zip(self.hub_slots, self.slots, strict=True) if s]
        return report.mean_and_sem(per_query)[1]

    @property
    def irrelevant_share(self) -> float:
        total = int(self.slots.sum())
        return float(self.irrelevant_slots.sum() / total) if total else math.nan

    def histogram(self) -> dict[int, int]:
        """c -> number of images that appear irrelevantly in exactly c queries' top K (c >= 1)."""
        values, frequency = np.unique(self.counts[self.counts > 0], return_counts=True)
        return {int(c): int(n) for c, n in zip(values, frequency, strict=True)}

    def top_hubs(
        self,
        limit: int = DEFAULT_LIST_SIZE,
        file_name: Callable[[int], str] | None = None,
        metadata: Callable[[int], dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        rows = []
        for idx in self.hubs[:limit]:
            idx = int(idx)
            meta = metadata(idx) if metadata is not None else {}
            rows.append(
                {
                    "id": idx,
                    "file": file_name(idx) if file_name is not None else None,
                    "count": int(self.counts[idx]),
                    "queries": self.queries_of.get(idx, []),
                    "concept": meta.get("concept") or None,
                    "metadata": meta,
                }
            )
        return rows

    def summary(self, top_hubs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {
            "top_k": self.top_k,
            "min_queries": self.min_queries,
            "num_queries": self.num_queries,
            "num_hubs": len(self.hubs),
            "hub_share": self.hub_share,
            "hub_share_sem": self.hub_share_sem,
            "irrelevant_share": self.irrelevant_share,
            "slots": int(self.slots.sum()),
            "hub_slots": int(self.hub_slots.sum()),
            "histogram": {str(c): n for c, n in self.histogram().items()},
            "top_hubs": top_hubs if top_hubs is not None else self.top_hubs(),
        }


def hubness(
    scores: np.ndarray,
    relevant: Sequence[np.ndarray | Sequence[int]],
    top_k: int = DEFAULT_TOP_K,
    min_queries: float = DEFAULT_MIN_QUERIES,
    query_ids: Sequence[int] | None = None,
) -> Hubness:
    """The hub diagnostic of `scores` [Q, N] (higher = more responsible) given each query's relevant
    ids; `query_ids` names the rows in reports (default 0..Q-1)."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or len(scores) != len(relevant):
        raise ValueError(
            f"scores must be [Q, N] with one relevant-id list per query: got {scores.shape} "
            f"and {len(relevant)} lists."
        )
    if int(top_k) < 1:
        raise ValueError(f"benchmark.hub_top_k={top_k}: give a top K of at least 1.")
    num_queries, num_train = scores.shape
    names = list(range(num_queries)) if query_ids is None else [int(q) for q in query_ids]
    threshold = resolve_min_queries(min_queries, num_queries)
    tops = top_k_ids(scores, int(top_k))
    counts = np.zeros(num_train, dtype=np.int64)
    queries_of: dict[int, list[int]] = {}
    irrelevant_tops = []
    for name, top, ids in zip(names, tops, relevant, strict=True):
        wrong = top[~np.isin(top, np.asarray(ids, dtype=np.int64))]
        irrelevant_tops.append(wrong)
        counts[wrong] += 1  # an id appears once per top K
        for idx in wrong:
            queries_of.setdefault(int(idx), []).append(name)
    is_hub = counts >= threshold
    return Hubness(
        top_k=int(top_k),
        min_queries=threshold,
        num_queries=num_queries,
        num_train=num_train,
        counts=counts,
        queries_of=queries_of,
        slots=np.array([len(t) for t in tops], dtype=np.int64),
        hub_slots=np.array([int(is_hub[w].sum()) for w in irrelevant_tops], dtype=np.int64),
        irrelevant_slots=np.array([len(w) for w in irrelevant_tops], dtype=np.int64),
        query_ids=names,
    )


def run_hubness(
    result: RetrievalResult,
    top_k: int = DEFAULT_TOP_K,
    min_queries: float = DEFAULT_MIN_QUERIES,
) -> Hubness:
    """The hub diagnostic of an attribute.py run on the queries its retrieval evaluation kept (those
    with ground truth), with the same scores and relevant ids."""
    if result.scores is None or result.relevant is None:
        raise ValueError("run_hubness needs a RetrievalResult from evaluate_run (it keeps the scores).")
    kept = [int(row["query"]) for row in result.rows]
    relevant = [np.asarray(ids, dtype=np.int64) for ids in result.relevant]
    return hubness(result.scores, relevant, top_k=top_k, min_queries=min_queries, query_ids=kept)


def hub_list(result: Hubness, datamodule: CaptionedImageDataModule, limit: int) -> list[dict[str, Any]]:
    """The top `limit` hubs with their file names and metadata from the data."""
    source = datamodule.source

    def metadata(idx: int) -> dict[str, Any]:  # JSON-ready (numpy numbers, paths as text)
        return json.loads(json.dumps(source.metadata(idx), default=str))

    return result.top_hubs(limit, file_name=source.file_name, metadata=metadata)


# ---------------------------------------------------------------------------------------- reporting
def share_heading(top_k: int) -> str:
    return f"hub share of top-{top_k}"


def describe(result: Hubness) -> str:
    """What the numbers mean, a sentence for the reports."""
    return (
        f"Hub images are training images in the top {result.top_k} of at least {result.min_queries} of the "
        f"{result.num_queries} queries without being relevant to them; the hub share is the share of all "
        f"top-{result.top_k} slots they hold where they are not relevant (mean ± s.e. over queries)."
    )


def hub_table(rows: list[dict[str, Any]], num_queries: int) -> str:
    body = [
        [
            r["id"],
            r["file"] or "",
            f"{r['count']} / {num_queries}",
            r["concept"] or "",
            ", ".join(str(q) for q in r["queries"]),
        ]
        for r in rows
    ]
    return report.markdown_table(["id", "file", "queries (irrelevant)", "concept", "in the top K of"], body)


def markdown(result: Hubness, rows: list[dict[str, Any]]) -> str:
    """hubness.md of one run: the headline numbers, the top hubs and the histogram."""
    lines = [
        f"# Hub images (top {result.top_k})",
        "",
        describe(result),
        "",
        f"- {share_heading(result.top_k)}: "
        f"{report.format_mean_sem(result.hub_share, result.hub_share_sem)} "
        f"({int(result.hub_slots.sum())} of {int(result.slots.sum())} slots)",
        f"- hub images: {len(result.hubs)}",
        f"- share of top-{result.top_k} slots held by any irrelevant image: {result.irrelevant_share:.3f}",
        "",
    ]
    if rows:
        lines += [
            f"## Top hubs ({len(rows)} of {len(result.hubs)})",
            "",
            hub_table(rows, result.num_queries),
            "",
        ]
    histogram = result.histogram()
    if histogram:
        lines += [
            "## Images by the number of queries whose top K they enter irrelevantly",
            "",
            report.markdown_table(["queries", "images"], [[c, n] for c, n in histogram.items()]),
            "",
        ]
    return "\n".join(lines)


def csv_rows(rows: list[dict[str, Any]], method: str | None = None) -> list[dict[str, Any]]:
    """The top hubs as flat CSV rows (metadata as columns `meta.<key>`)."""
    flat = []
    for r in rows:
        row: dict[str, Any] = {} if method is None else {"method": method}
        row.update({k: r[k] for k in ("id", "file", "count", "concept")})
        row["queries"] = " ".join(str(q) for q in r["queries"])
        flat.append(row)
    return flat


def histogram_plot(path: str | Path, results: dict[str, Hubness]) -> Path:
    """Per method, the number of images that enter the top K of exactly c queries irrelevantly,
    c = 1..Q (a line per method)."""
    num_queries = max(r.num_queries for r in results.values())
    xs = list(range(1, num_queries + 1))
    series = {}
    for label, result in results.items():
        histogram = result.histogram()
        series[label] = (xs, [histogram.get(c, 0) for c in xs], None)
    top_k = next(iter(results.values())).top_k
    return report.line_plot(
        path,
        series,
        xlabel=f"queries whose top {top_k} the image enters without being relevant",
        ylabel="training images",
        title=f"How many queries each image crowds (hubs: >= {next(iter(results.values())).min_queries})",
        grid=True,
    )


def share_plot(path: str | Path, results: dict[str, Hubness]) -> Path:
    """Per method, the hub share of the top K (mean ± s.e. over queries)."""
    labels = list(results)
    top_k = next(iter(results.values())).top_k
    return report.bar_chart(
        path,
        labels,
        {
            share_heading(top_k): (
                [results[m].hub_share for m in labels],
                [results[m].hub_share_sem for m in labels],
            )
        },
        ylabel=f"mean ± s.e. over {next(iter(results.values())).num_queries} queries",
        suptitle="Top-K slots held by hub images (lower is better)",
        ylim=(0, 1.1),
        annotate=True,
    )
