"""`evaluate.py benchmark=retrieval scores=<attribute run dir>`: how well a ranking retrieves the
training images known to be responsible for a query.

Ground truth comes from the data's metadata. A query record in ranking.json may list its
`relevant_ids` itself (AbC-style exemplars); otherwise, when the training metadata has a `concept`
field (the embedded world's rare concepts), the relevant images of a query are the training images of
the concept its caption names. Queries without ground truth are skipped and reported.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torchmetrics.retrieval import RetrievalMAP, RetrievalPrecision, RetrievalRecall

from diffusion_attribution.data.base import CaptionedImageDataModule

logger = logging.getLogger(__name__)

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


def load_attribution_run(scores_dir: str | Path, num_examples: int) -> tuple[np.ndarray, dict[str, Any]]:
    """scores.npy and ranking.json of an attribute.py run directory, checked against the data."""
    scores_dir = Path(scores_dir)
    for name in ("scores.npy", "ranking.json"):
        if not (scores_dir / name).is_file():
            raise FileNotFoundError(
                f"{scores_dir / name} not found: scores= must be a run directory written by attribute.py."
            )
    score_array = np.load(scores_dir / "scores.npy")
    ranking = json.loads((scores_dir / "ranking.json").read_text())
    queries = ranking["queries"]
    if score_array.shape != (len(queries), num_examples):
        raise ValueError(
            f"{scores_dir / 'scores.npy'} has shape {score_array.shape} but there are {len(queries)} queries and "
            f"the data has {num_examples} examples: evaluate with the data the attribution was run on."
        )
    return score_array, ranking


@dataclass
class RetrievalResult:
    """One attribution run scored against the ground truth."""

    ranking: dict[str, Any]
    rows: list[dict[str, Any]]  # per evaluated query: query index, caption, num_relevant, metrics
    mean: dict[str, float]
    sem: dict[str, float]

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
    names = list(per_query[0])
    mean = {name: float(np.mean([r[name] for r in per_query])) for name in names}
    sem = {
        name: float(np.std([r[name] for r in per_query], ddof=1) / np.sqrt(len(per_query)))
        if len(per_query) > 1
        else 0.0
        for name in names
    }
    return RetrievalResult(ranking, rows, mean, sem)


def run_retrieval_benchmark(
    cfg: DictConfig, run_dir: str | Path, scores: str | list[str] | None = None
) -> dict[str, Any]:
    """One run directory: per-query metrics (retrieval.csv/.md, metrics.json). Several (a list):
    the method comparison table (see evaluation/comparison.py)."""
    if OmegaConf.is_config(scores):
        scores = OmegaConf.to_container(scores, resolve=True)  # type: ignore[assignment]
    if isinstance(scores, (list, tuple)):
        if len(scores) > 1:
            from diffusion_attribution.evaluation.comparison import run_comparison

            return run_comparison(cfg, run_dir, [str(s) for s in scores])
        scores = str(scores[0]) if scores else None
    if not scores:
        raise ValueError(
            "benchmark=retrieval needs scores=<run directory of attribute.py> (holds scores.npy), or "
            "scores='[<run dir>,<run dir>,...]' to compare methods."
        )
    datamodule: CaptionedImageDataModule = hydra.utils.instantiate(cfg.data)
    result = evaluate_run(scores, datamodule, concept_index(datamodule))
    rows, mean, sem, names = result.rows, result.mean, result.sem, result.metric_names
    summary = result.summary()

    run_dir = Path(run_dir)
    with open(run_dir / "retrieval.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    lines = ["| query | caption | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    lines += [
        f"| {r['query']} | {r['caption']} | " + " | ".join(f"{r[n]:.3f}" for n in names) + " |" for r in rows
    ]
    lines.append("| **mean ± s.e.** | | " + " | ".join(f"{mean[n]:.3f} ± {sem[n]:.3f}" for n in names) + " |")
    (run_dir / "retrieval.md").write_text("\n".join(lines) + "\n")
    _log_to_wandb(cfg, summary, rows)
    log.info("Retrieval (%s, %d queries): %s", summary["method"], len(rows), mean)
    return summary


def _log_to_wandb(cfg: DictConfig, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    logger_cfg = cfg.get("logger")
    if not logger_cfg or "Wandb" not in str(logger_cfg.get("_target_", "")):
        return
    logger = hydra.utils.instantiate(logger_cfg)
    logger.log_metrics({f"retrieval/{k}": v for k, v in summary["mean"].items()})
    logger.log_table("retrieval/per_query", columns=list(rows[0]), data=[list(r.values()) for r in rows])
    logger.experiment.finish()
