"""One interface for every attribution method (two phases, as in TRAK and kronfluence):

    attributor.prepare(model, datamodule, context)  # cacheable per-model work (Fisher, base losses,
                                                    # projected gradients, features), keyed by what made it
    attributor.score(queries) -> [num_queries, num_examples]  # higher = more influential

Scores speak in the data's stable ids: column i is training example i, for every example of the
source (ids excluded from the model's training still get a column). A run may score a chosen subset
of ids (`score_ids` in conf/attribute.yaml): the context then carries them as `candidate_ids`, a method
may compute only those columns, and `mask_unscored` puts every other column below all scored ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_attribution.attribution.queries import Query
from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.models.pipeline import TextToImageModel


@dataclass
class AttributionContext:
    """Where an attributor may cache per-model work and write per-run files, and how to run loops."""

    cache_dir: Path
    run_dir: Path
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    # The ids this run scores (sorted, unique), or None for every id. Columns outside them are masked
    # by the job (`mask_unscored`), so a method may skip them (unlearning sweeps only these) or not.
    candidate_ids: np.ndarray | None = None


def mask_unscored(scores: np.ndarray, candidate_ids: np.ndarray | None) -> np.ndarray:
    """`scores` [num_queries, num_examples] with every column outside `candidate_ids` set, per query,
    to the lowest scored value minus max(1, |lowest|): finite, strictly below every scored column
    (also in float32, where a plain "minus 1" is lost for large scores), and the same for all unscored
    columns (they tie, and a stable sort keeps them in id order after the scored ones)."""
    if candidate_ids is None:
        return scores
    scores = np.array(scores, dtype=np.float32, copy=True)
    outside = np.ones(scores.shape[1], dtype=bool)
    outside[candidate_ids] = False
    if not outside.any() or len(candidate_ids) == 0:
        return scores
    lowest = scores[:, candidate_ids].min(axis=1).astype(np.float64)
    fill = lowest - np.maximum(1.0, np.abs(lowest))
    scores[:, outside] = fill[:, None].astype(np.float32)
    return scores


def disk_bytes(*paths: Path) -> int:
    """Total size of the files at `paths` (files, or folders counted recursively; missing ones 0)."""
    total = 0
    for path in paths:
        path = Path(path)
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return total


class Attributor(ABC):
    name: str = "attributor"

    def __init__(self) -> None:
        self.query_records: list[dict[str, Any]] = []  # per-query diagnostics for ranking.json

    @abstractmethod
    def prepare(
        self, model: TextToImageModel, datamodule: CaptionedImageDataModule, context: AttributionContext
    ) -> None:
        """Per-model work, cached under context.cache_dir keyed by model, data and config."""

    @abstractmethod
    def score(self, queries: list[Query]) -> np.ndarray:
        """float32 [len(queries), num_examples], higher = more influential."""

    def config(self) -> dict[str, Any]:
        """The settings that decide the scores (written into ranking.json)."""
        return {}

    def train_side_bytes(self) -> int:
        """Bytes of per-model work this method keeps on disk for scoring (Fisher and loss sweeps,
        projected gradients, features): the storage column of method comparisons."""
        return 0
