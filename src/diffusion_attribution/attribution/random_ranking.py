"""`method=random`: a seeded random ranking, the chance level every method must beat.

A query's scores are uniform draws from a generator keyed by (seed, the query itself: its caption and
its image quantised to 8 bits): the same seed gives the same table, the same query gets the same
ranking in any run or position, and different queries (also the first queries of separate runs, such
as one run per AbC concept) get different rankings. Nothing is prepared or stored.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from diffusion_attribution.attribution.base import AttributionContext, Attributor
from diffusion_attribution.attribution.queries import Query
from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.utils.seeding import keyed_generator


def query_key(query: Query) -> int:
    """A stable integer naming the query by its content (caption and 8-bit image)."""
    pixels = ((query.image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    digest = hashlib.blake2b(query.caption.encode(), digest_size=8)
    digest.update(pixels.contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


class RandomAttributor(Attributor):
    name = "random"

    def prepare(
        self, model: TextToImageModel, datamodule: CaptionedImageDataModule, context: AttributionContext
    ) -> None:
        self.num_examples = datamodule.num_examples  # every id of the source, excluded ones included
        self.seed = context.seed

    def score(self, queries: list[Query]) -> np.ndarray:
        rows = [
            torch.rand(self.num_examples, generator=keyed_generator(self.seed, query_key(query)))
            for query in queries
        ]
        return torch.stack(rows).numpy().astype(np.float32)

    def config(self) -> dict[str, Any]:
        return {"seed": getattr(self, "seed", None)}
