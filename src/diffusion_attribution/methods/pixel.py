"""`method=pixel`: shorthand for `method=features backbone=pixel` (cosine similarity of centred
pixels, the paper's weakest feature baseline and the sanity floor for every other method)."""

from __future__ import annotations

from .features import FeatureAttributor


class PixelAttributor(FeatureAttributor):
    def __init__(self, batch_size: int = 512, shard_size: int = 1024, store: str | None = None) -> None:
        super().__init__("pixel", batch_size=batch_size, shard_size=shard_size, store=store)
