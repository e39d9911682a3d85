"""Retrieval metrics of a ranking against the training images known to be responsible for a query
(used by benchmark=retrieval, the method comparison, AbC and leave-K-out's concept lookup).

Ground truth comes from the data's metadata. A query record in ranking.json may list its
`relevant_ids` itself (AbC-style exemplars); otherwise, when the training metadata has a `concept`
field (the embedded world's rare concepts), the relevant images of a query are the training images of
the concept its caption names. Queries without ground truth are skipped and reported.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.retrieval import RetrievalMAP, RetrievalPrecision, RetrievalRecall

from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.evaluation.report import mean_and_sem

log = logging.getLogger(__name__)


def concept_index(datamodule: CaptionedImageDataModule) -> dict[str, np.ndarray]:
    """concept word -> ids of the training images that show it (from metadata `concept`)."""
    source = datamodule.source
    members: dict[str, list[int]] = {}
    for idx in range(len(source)):
        concept = source.metadata(idx).get("concept")
        if concept:
            members.setdefault(str(concept), []).append(idx)
    return {c: np.asarray(ids, dtype=np.int64) for c, ids in members.items()}


def relevant_ids_for(query: dict[str, Any], concepts: dict[str, np.ndarray]) -> np.ndarray | None:
    if query.get("relevant_ids") is not None:
        return np.asarray(query["relevant_ids"], dtype=np.int64)
    if query.get("concept"):
        return concepts.get(str(query["concept"]))
    words = set(re.findall(r"[a-z0-9]+", str(query.get("caption") or query.get("prompt") or "").lower()))
    named = [c for c in concepts if c.lower() in words]
    if len(named) == 1:
        return concepts[named[0]]
    return None


def retrieval_metrics(
    scores: np.ndarray,
    relevant: list[np.ndarray],
    precision_at: tuple[int, ...] = (10,),
    recall_at: tuple[int, ...] = (10, 100),
) -> list[dict[str, float]]:
    """Per-query Precision@k, Recall@k and average precision (torchmetrics), keyed
    `precision@k`, `recall@k` and `ap`. AP is (1/P) sum_i i / rank_i over the P relevant items'
    1-based ranks, the definition of the AbC benchmark."""
    metrics = {
        **{f"precision@{k}": RetrievalPrecision(top_k=k) for k in precision_at},
        **{f"recall@{k}": RetrievalRecall(top_k=k) for k in recall_at},
        "ap": RetrievalMAP(),
    }
    rows = []
    num_train = scores.shape[1]
    for q in range(len(scores)):
        target = torch.zeros(num_train, dtype=torch.bool)
        target[torch.as_tensor(relevant[q])] = True
        preds = torch.as_tensor(scores[q], dtype=torch.float64)
        preds = torch.nan_to_num(preds, nan=-torch.inf)  # excluded / unscored ids rank last
        # torchmetrics' retrieval metrics count an item with a score <= 0 as not retrieved at all,
        # while attribution scores (loss changes) are often negative: pass the dense rank instead
        # (1 = lowest score), which keeps the order and the ties and is always positive.
        preds = (torch.unique(preds, return_inverse=True)[1] + 1).to(torch.float64)
        indexes = torch.zeros(num_train, dtype=torch.long)
        rows.append({name: float(m(preds, target, indexes=indexes)) for name, m in metrics.items()})
        for m in metrics.values():
            m.reset()
    return rows


class AttributionRunError(ValueError):
    """A run directory whose files cannot be trusted; the message names the file and the fix."""


def read_scores(path: Path) -> np.ndarray:
    """scores.npy of a run: readable, a 2-D array of real numbers, every value finite. A truncated
    or corrupt file, or one with NaN/inf (which would rank as a plausible, wrong answer), is refused."""
    rerun = "Rerun attribute.py for this run (into a new run directory) and evaluate its output."
    try:
        scores = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise AttributionRunError(
            f"{path} cannot be read as a .npy array ({type(error).__name__}: {error}): it is truncated or "
            f"not a scores file written by attribute.py. {rerun}"
        ) from None
    if not isinstance(scores, np.ndarray) or scores.ndim != 2 or not np.issubdtype(scores.dtype, np.number):
        raise AttributionRunError(
            f"{path} holds a {getattr(scores, 'dtype', type(scores))} array of shape "
            f"{getattr(scores, 'shape', None)}, not the [num_queries, num_examples] scores attribute.py writes. {rerun}"
        )
    finite = np.isfinite(scores)
    if not finite.all():
        rows = np.flatnonzero(~finite.all(axis=1))
        raise AttributionRunError(
            f"{path} holds {int((~finite).sum())} NaN or inf values (queries {rows[:10].tolist()}): its ranking "
            f"would look plausible and be wrong. {rerun}"
        )
    return scores


def read_ranking(path: Path) -> dict[str, Any]:
    """ranking.json of a run; one without a model fingerprint (written before they were recorded) is
    read with a warning: it can be compared by its model path only."""
    try:
        ranking = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise AttributionRunError(
            f"{path} cannot be read as JSON ({error}): it is truncated or not written by attribute.py. "
            "Rerun attribute.py for this run and evaluate its output."
        ) from None
    if not isinstance(ranking, dict) or not isinstance(ranking.get("queries"), list):
        raise AttributionRunError(f"{path} has no `queries` list: it is not a ranking.json of attribute.py.")
    if not ranking.get("model_fingerprint"):
        log.warning(
            "%s records no model fingerprint (written by an older attribute.py): it is identified by its model "
            "path %s only; a different model saved at that path would not be noticed.",
            path,
            ranking.get("model"),
        )
    return ranking


def load_attribution_run(scores_dir: str | Path, num_examples: int) -> tuple[np.ndarray, dict[str, Any]]:
    """scores.npy and ranking.json of an attribute.py run directory, checked against the data. The
    ranking carries `model_fingerprint` and `data_fingerprint` (None for older runs): callers comparing
    several runs check them with `check_same_model`."""
    scores_dir = Path(scores_dir)
    for name in ("scores.npy", "ranking.json"):
        if not (scores_dir / name).is_file():
            raise FileNotFoundError(
                f"{scores_dir / name} not found: scores= must be a run directory written by attribute.py."
            )
    ranking = read_ranking(scores_dir / "ranking.json")
    score_array = read_scores(scores_dir / "scores.npy")
    queries = ranking["queries"]
    if score_array.shape != (len(queries), num_examples):
        raise ValueError(
            f"{scores_dir / 'scores.npy'} has shape {score_array.shape} but there are {len(queries)} queries and "
            f"the data has {num_examples} examples: evaluate with the data the attribution was run on."
        )
    return score_array, ranking


def check_same_model(rankings: list[dict[str, Any]], dirs: list[str | Path] | list[str] | list[Path]) -> None:
    """Runs compared together attributed one model on one data set: their recorded fingerprints
    (ranking.json `model_fingerprint`, `data_fingerprint`) must agree, whatever paths they name (a
    checkpoint retrained into the same folder is another model). Runs written before fingerprints were
    recorded are let through with a warning."""
    dirs = [str(d) for d in dirs]
    missing = [d for r, d in zip(rankings, dirs, strict=True) if not r.get("model_fingerprint")]
    if missing:
        log.warning(
            "%s record no model fingerprint (older attribute.py runs): they are compared by model path only.",
            ", ".join(missing),
        )
    for key, what in (("model_fingerprint", "model"), ("data_fingerprint", "data")):
        reference: tuple[str, dict[str, Any], str] | None = None  # (fingerprint, ranking, run dir)
        for ranking, run in zip(rankings, dirs, strict=True):
            value = ranking.get(key)
            if not value:
                continue
            if reference is None:
                reference = (value, ranking, run)
                continue
            if value != reference[0]:
                claim = ""
                if what == "model" and ranking.get("model") == reference[1].get("model"):
                    claim = (
                        f" although both name the model path {ranking.get('model')} (another model was saved "
                        "there between the runs)"
                    )
                raise AttributionRunError(
                    f"{run} attributed another {what} ({key} {value}) than {reference[2]} ({reference[0]}){claim}: "
                    f"runs compared together must be of one {what}. Rerun attribute.py for the stale runs with "
                    "the current model.path and data=, or compare them separately."
                )


@dataclass
class RetrievalResult:
    """One attribution run scored against the ground truth."""

    ranking: dict[str, Any]
    rows: list[dict[str, Any]]  # per evaluated query: query index, caption, num_relevant, metrics
    mean: dict[str, float]
    sem: dict[str, float]
    scores: np.ndarray | None = None  # [evaluated queries, examples]: the rows of `rows`, in order
    relevant: list[np.ndarray] | None = None  # each evaluated query's relevant ids

    @property
    def metric_names(self) -> list[str]:
        return list(self.mean)

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.ranking.get("method"),
            "num_queries": len(self.rows),
            "mean": self.mean,
            "sem": self.sem,
        }


def evaluate_run(
    scores_dir: str | Path, datamodule: CaptionedImageDataModule, concepts: dict[str, np.ndarray]
) -> RetrievalResult:
    """Per-query retrieval metrics of one run (queries without ground truth skipped), mean and s.e."""
    score_array, ranking = load_attribution_run(scores_dir, datamodule.num_examples)
    queries = ranking["queries"]
    keep, relevant = [], []
    for q, query in enumerate(queries):
        ids = relevant_ids_for(query, concepts)
        if ids is None or len(ids) == 0:
            log.warning(
                "Query %d (%s) has no ground truth in the metadata; skipped.", q, query.get("caption")
            )
            continue
        keep.append(q)
        relevant.append(ids)
    if not keep:
        raise ValueError("No query has ground truth: name a rare concept in the prompt or give relevant_ids.")
    per_query = retrieval_metrics(score_array[keep], relevant)
    rows = []
    for q, ids, metrics in zip(keep, relevant, per_query, strict=True):
        rows.append({"query": q, "caption": queries[q].get("caption"), "num_relevant": len(ids), **metrics})
    mean, sem = {}, {}
    for name in per_query[0]:
        mean[name], sem[name] = mean_and_sem([r[name] for r in per_query])
    return RetrievalResult(ranking, rows, mean, sem, score_array[keep], relevant)


def query_retrieval_metrics(
    scores: np.ndarray,
    records: list[dict[str, Any]],
    datamodule: CaptionedImageDataModule,
    score_ids: np.ndarray | None = None,
) -> dict[str, Any] | None:
    """Retrieval mAP, Recall@10 and Precision@10 over the queries that carry ground truth
    (`query.relevant_ids`, or a `query.concepts` entry the data's metadata resolves), or None when none
    does. With `score_ids` they are measured within the scored subset (higher than over the whole
    training set: compare settings, not numbers)."""
    labelled = [k for k, r in enumerate(records) if r.get("relevant_ids") is not None or r.get("concept")]
    if not labelled:
        return None
    concepts = concept_index(datamodule) if any(records[k].get("concept") for k in labelled) else {}
    columns = np.arange(scores.shape[1]) if score_ids is None else score_ids
    rows, relevant = [], []
    for k in labelled:
        ids = relevant_ids_for({key: records[k].get(key) for key in ("relevant_ids", "concept")}, concepts)
        ids = np.intersect1d(ids if ids is not None else [], columns)
        if len(ids) == 0:
            log.warning("Query %d names no relevant id among the scored ones: left out of the metrics.", k)
            continue
        rows.append(k)
        relevant.append(np.searchsorted(columns, ids))
    if not rows:
        return None
    per_query = retrieval_metrics(scores[rows][:, columns], relevant, precision_at=(10,), recall_at=(10,))
    return {
        "map": float(np.mean([m["ap"] for m in per_query])),
        "recall@10": float(np.mean([m["recall@10"] for m in per_query])),
        "precision@10": float(np.mean([m["precision@10"] for m in per_query])),
        "num_queries": len(rows),
        "over": "all" if score_ids is None else f"score_ids ({len(columns)} ids)",
        "per_query": [{"query": k, **m} for k, m in zip(rows, per_query, strict=True)],
    }
