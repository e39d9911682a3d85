"""`method=pixel`: training images ranked by pixel-space cosine similarity to the query image (the
paper's weakest feature baseline; also the sanity floor for every other method)."""

from __future__ import annotations

import numpy as np
import torch

from ..data.base import CaptionedImageDataModule
from ..data.queries import Query
from ..models.pipeline import TextToImageModel
from .base import AttributionContext, Attributor


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.flatten(1).double()
    x = x - x.mean(dim=1, keepdim=True)  # cosine of centred pixels: brightness offsets do not count
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class PixelAttributor(Attributor):
    name = "pixel"

    def __init__(self, batch_size: int = 512) -> None:
        super().__init__()
        self.batch_size = batch_size

    def prepare(
        self, model: TextToImageModel, datamodule: CaptionedImageDataModule, context: AttributionContext
    ) -> None:
        dataset = datamodule.full_dataset()
        ids = list(range(datamodule.num_examples))
        rows = []
        for start in range(0, len(ids), self.batch_size):
            batch = torch.stack(
                [dataset.example(i)["pixel_values"] for i in ids[start : start + self.batch_size]]
            )
            rows.append(_unit_rows(batch))
        self.features = torch.cat(rows)

    def score(self, queries: list[Query]) -> np.ndarray:
        q = _unit_rows(torch.stack([query.image for query in queries]))
        return (q @ self.features.T).to(torch.float32).numpy()
