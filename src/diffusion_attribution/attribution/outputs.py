"""What an attribution run writes: scores.npy (float32 [num_queries, num_examples]), ranking.json
(each query with its top-k training examples, the method's settings and diagnostics), ranking.png
(each query next to its top images); jobs/attribute.py sends them to W&B with logger=wandb."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from diffusion_attribution.attribution.base import Attributor
from diffusion_attribution.attribution.queries import Query
from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.utils.images import titled_grid

log = logging.getLogger(__name__)


def top_ids(row: np.ndarray, k: int, score_ids: np.ndarray | None = None) -> np.ndarray:
    """The k highest-scored ids of one query (ties in id order); with `score_ids`, only among them."""
    if score_ids is None:
        return np.argsort(-row, kind="stable")[:k]
    return score_ids[np.argsort(-row[score_ids], kind="stable")][:k]


def save_scores(path: Path, scores: np.ndarray) -> None:
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
) -> Path:
    """scores.npy, ranking.json and ranking.png in `run_dir`; returns the figure's path."""
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
