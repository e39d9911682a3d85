"""`method=random`: a seeded random ranking, the chance level every method must beat."""

from __future__ import annotations

import numpy as np

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
        self.num_examples = datamodule.num_examples
        self.seed = context.seed

    def score(self, queries: list[Query]) -> np.ndarray:
        import torch

        rows = [
            torch.rand(self.num_examples, generator=keyed_generator(self.seed, k))
            for k in range(len(queries))
        ]
        return torch.stack(rows).numpy().astype(np.float32)
