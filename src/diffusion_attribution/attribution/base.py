"""One interface for every attribution method (two phases, as in TRAK and kronfluence):

    attributor.prepare(model, datamodule, context)  # cacheable per-model work (Fisher, base losses,
                                                    # projected gradients, features), keyed by what made it
    attributor.score(queries) -> [num_queries, num_examples]  # higher = more influential

Scores speak in the data's stable ids: column i is training example i, for every example of the
source (ids excluded from the model's training still get a column).
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
