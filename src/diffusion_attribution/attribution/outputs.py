"""What an attribution run writes: scores.npy (float32 [num_queries, num_examples]), ranking.json
(each query with its top-k training examples, the method's settings and diagnostics), ranking.png
(each query next to its top images); jobs/attribute.py sends them to W&B with logger=wandb."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from diffusion_attribution.attribution.base import Attributor
from diffusion_attribution.attribution.queries import Query
from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.utils.fingerprint import data_fingerprint, model_fingerprint
from diffusion_attribution.utils.images import titled_grid

log = logging.getLogger(__name__)


def top_ids(row: np.ndarray, k: int, score_ids: np.ndarray | None = None) -> np.ndarray:
    """The k highest-scored ids of one query (ties in id order); with `score_ids`, only among them."""
    if score_ids is None:
        return np.argsort(-row, kind="stable")[:k]
    return score_ids[np.argsort(-row[score_ids], kind="stable")][:k]


class NonFiniteScoresError(FloatingPointError):
    """A method gave NaN or inf scores: nothing is written, the message names the method and queries."""


def check_finite_scores(scores: np.ndarray, method: str, queries: list[Query] | None = None) -> None:
    """Refuse scores with NaN or inf, naming the method and the queries that have them."""
    scores = np.atleast_2d(scores)
    bad_rows = np.flatnonzero(~np.isfinite(scores).all(axis=1))
    if len(bad_rows) == 0:
        return
    described = []
    for k in bad_rows[:5]:
        caption = queries[k].caption if queries is not None and k < len(queries) else None
        count = int((~np.isfinite(scores[k])).sum())
        described.append(f"query {k}" + (f" ({caption!r})" if caption else "") + f": {count} non-finite")
    more = f" and {len(bad_rows) - 5} more queries" if len(bad_rows) > 5 else ""
    raise NonFiniteScoresError(
        f"method={method} gave NaN or inf scores for {'; '.join(described)}{more} (of {scores.shape[-1]} "
        "training examples). No scores.npy is written: a ranking over them would look plausible and be wrong. "
        "Check the method's settings (e.g. a smaller method.step_size for unlearning, a larger method.damping "
        "for TRAK) and that the model's weights are finite."
    )


def run_fingerprints(
    attributor: Attributor, model: Any, datamodule: CaptionedImageDataModule
) -> dict[str, str]:
    """The model's and the data's fingerprints (utils/fingerprint.py) for ranking.json: a run is its
    model's, not its model path's (a path can hold another model later). Reuses what the method already
    computed for its caches."""
    identity = getattr(attributor, "identity", None) or {}
    return {
        "model_fingerprint": str(identity.get("model") or model_fingerprint(model)),
        "data_fingerprint": str(identity.get("data") or data_fingerprint(datamodule)),
    }


def save_scores(path: Path, scores: np.ndarray) -> None:
    if not np.isfinite(scores).all():  # check_finite_scores names the queries; this is the last guard
        raise NonFiniteScoresError(f"Refusing to write {path}: the scores hold NaN or inf values.")
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, scores.astype(np.float32))
    os.replace(tmp, path)


def write_outputs(
    run_dir: Path,
    scores: np.ndarray,
    queries: list[Query],
    attributor: Attributor,
    datamodule: CaptionedImageDataModule,
    cfg: DictConfig,
    timing: dict[str, float],
    score_ids: np.ndarray | None = None,
    fingerprints: dict[str, str] | None = None,
) -> Path:
    """scores.npy, ranking.json and ranking.png in `run_dir`; returns the figure's path. `fingerprints`
    (`run_fingerprints`) identify the model and the data beyond their paths."""
    top_k = int(cfg.top_k)
    save_scores(run_dir / "scores.npy", scores)
    source = datamodule.source
    records = []
    for k, query in enumerate(queries):
        order = top_ids(scores[k], top_k, score_ids)
        record = {
            **query.record(),
            "top_k": [
                {"id": int(i), "score": float(scores[k, i]), "file": source.file_name(int(i))} for i in order
            ],
        }
        if k < len(attributor.query_records):
            record["diagnostics"] = attributor.query_records[k]
        records.append(record)
    ranking = {
        "method": attributor.name,
        "method_config": attributor.config(),
        "model": cfg.model.get("path"),
        # What the model and the data were, not only where: evaluation refuses to compare runs of two
        # different models saved at one path (evaluation/retrieval.py check_same_model).
        "model_fingerprint": (fingerprints or {}).get("model_fingerprint"),
        "data_fingerprint": (fingerprints or {}).get("data_fingerprint"),
        "num_examples": int(scores.shape[1]),
        # null: every id was scored; else the ids scored (the others rank below all of them)
        "score_ids": None if score_ids is None else score_ids.tolist(),
        "timing": timing,
        "train_side_mb": attributor.train_side_bytes() / 2**20,
        "queries": records,
    }
    (run_dir / "ranking.json").write_text(json.dumps(ranking, indent=2, default=str))
    png = ranking_figure(
        run_dir / "ranking.png", scores, queries, datamodule, top_k=min(top_k, 8), score_ids=score_ids
    )
    log.info("Wrote %s, ranking.json and %s", run_dir / "scores.npy", png)
    print(f"Ranking: {png}")
    return png


def ranking_figure(
    path: Path,
    scores: np.ndarray,
    queries: list[Query],
    datamodule: CaptionedImageDataModule,
    top_k: int = 8,
    score_ids: np.ndarray | None = None,
) -> Path:
    """Each row: the query, then its top-k training images with id and score."""
    dataset = datamodule.full_dataset()
    images, titles = [], []
    for k, query in enumerate(queries):
        images.append(query.image)
        titles.append(f"query {k}\n{query.caption[:40]}")
        for i in top_ids(scores[k], top_k, score_ids):
            images.append(dataset.example(int(i))["pixel_values"])
            titles.append(f"#{int(i)}\n{scores[k, i]:.2e}")
    ncol = 1 + min(top_k, scores.shape[1] if score_ids is None else len(score_ids))
    return titled_grid(
        torch.stack(images), titles, path, ncol=ncol, suptitle="query | top training images (id, score)"
    )
