"""`method=random`: a seeded random ranking, the chance level every method must beat.

Query k's scores are uniform draws from a generator keyed by (seed, k): the same seed gives the same
table, and no two queries share a ranking. Nothing is prepared or stored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data.base import CaptionedImageDataModule
from ..data.queries import Query
from ..models.pipeline import TextToImageModel
from ..utils.seeding import keyed_generator
from .base import AttributionContext, Attributor


class RandomAttributor(Attributor):
    name = "random"

    def prepare(
        self, model: TextToImageModel, datamodule: CaptionedImageDataModule, context: AttributionContext
    ) -> None:
        self.num_examples = datamodule.num_examples  # every id of the source, excluded ones included
        self.seed = context.seed

    def score(self, queries: list[Query]) -> np.ndarray:
        rows = [
            torch.rand(self.num_examples, generator=keyed_generator(self.seed, k))
            for k in range(len(queries))
        ]
        return torch.stack(rows).numpy().astype(np.float32)

    def config(self) -> dict[str, Any]:
        return {"seed": getattr(self, "seed", None)}
