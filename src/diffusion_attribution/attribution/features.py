"""`method=features backbone=pixel|clip|clip_text|dino|dinov2`: training images ranked by the cosine
similarity of their features to the query's (the paper's feature-similarity baselines).

Image backbones compare the query image with every training image. `clip_text` compares the query's
caption with the training captions; an example with several captions scores the best of them (max
over its captions): a training example whose caption says what the query's says ranks first, however
its other captions are phrased (a mean would dilute that exact match with paraphrases).

prepare: features of every training image (or caption), unit-normalised, computed once per (backbone
weights, data, settings) as shards under `cache_dir/features/` (atomic, resumable, DDP-sharded by
`run_sharded`) and reused by every later query and run. The diffusion model plays no part, so every
checkpoint trained on the same data shares them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_attribution.attribution.base import AttributionContext, Attributor, disk_bytes
from diffusion_attribution.attribution.queries import Query
from diffusion_attribution.compute.sharded import run_sharded
from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.models.backbones import BACKBONES, FeatureBackbone, check_backbone, load_backbone
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.utils.fingerprint import data_fingerprint, hash_json

log = logging.getLogger(__name__)

__all__ = ["FeatureAttributor", "load_backbone"]


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    return (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(torch.float32)


class FeatureAttributor(Attributor):
    name = "features"

    def __init__(
        self,
        backbone: str | Mapping[str, Any] = "pixel",
        path: str | None = None,
        batch_size: int = 64,
        shard_size: int = 1024,
        store: str | None = None,
    ) -> None:
        """`backbone`: a name, or the `backbone` config group ({name, path}); `store`: an explicit
        folder for the training-side features (default: a folder under cache_dir keyed by what made
        them); a folder holding features made otherwise (other weights, data) is refused."""
        super().__init__()
        if isinstance(backbone, DictConfig):
            backbone = OmegaConf.to_container(backbone, resolve=True)  # type: ignore[assignment]
        if isinstance(backbone, Mapping):
            path = backbone.get("path", path)
            backbone = backbone.get("name")  # type: ignore[assignment]
        self.backbone_name = str(backbone)
        # Checked when the config is read: a bad name or missing weights fail before queries are made.
        folder = check_backbone(self.backbone_name, path)
        self.path = None if folder is None else str(folder)
        self.side = "text" if self.backbone_name == "clip_text" else "image"
        self.name = f"features:{self.backbone_name}"
        self.batch_size = int(batch_size)
        self.shard_size = int(shard_size)
        self.store = store

    def prepare(
        self, model: TextToImageModel, datamodule: CaptionedImageDataModule, context: AttributionContext
    ) -> None:
        self.backbone: FeatureBackbone = load_backbone(self.backbone_name, self.path, model.device)
        dataset = datamodule.full_dataset()  # every id gets a column, excluded ones included
        self.num_examples = datamodule.num_examples
        self.identity = {
            "backbone": self.backbone_name,
            "side": self.side,
            "weights": self.backbone.fingerprint(),
            "data": data_fingerprint(datamodule),
            "resolution": int(datamodule.resolution),
            "caption_reduction": "max" if self.side == "text" else None,
        }
        key = hash_json([self.identity, self.shard_size])
        self.store_dir = (
            Path(self.store) if self.store else context.cache_dir / "features" / f"{self.backbone_name}-{key}"
        )
        backbone, batch_size, side = self.backbone, self.batch_size, self.side

        def shard_fn(ids: np.ndarray) -> dict[str, torch.Tensor]:
            features, owners = [], []
            for start in range(0, len(ids), batch_size):
                chunk = [int(i) for i in ids[start : start + batch_size]]
                if side == "image":
                    pixels = torch.stack([dataset.example(i)["pixel_values"] for i in chunk])
                    features.append(_unit(backbone.image_features(pixels.to(backbone.device)).cpu()))
                    owners += chunk
                else:
                    captions = [(i, c) for i in chunk for c in dataset.source.captions(i)]
                    features.append(_unit(backbone.text_features([c for _, c in captions]).cpu()))
                    owners += [i for i, _ in captions]
            return {"features": torch.cat(features), "ids": torch.tensor(owners, dtype=torch.int64)}

        shards = run_sharded(
            backbone,
            shard_fn,
            np.arange(self.num_examples),
            self.store_dir,
            self.identity,
            shard_size=self.shard_size,
            trainer_kwargs=context.trainer_kwargs,
            description=f"{self.backbone_name} features of the training set",
        )
        self.features = torch.cat([s["features"] for s in shards])
        self.owners = torch.cat([s["ids"] for s in shards])
        if self.side == "image" and not torch.equal(self.owners, torch.arange(self.num_examples)):
            raise ValueError(f"{self.store_dir} does not hold one feature row per example; delete it.")

    def score(self, queries: list[Query]) -> np.ndarray:
        if self.side == "text":
            q = _unit(self.backbone.text_features([query.caption for query in queries]).cpu())
            per_caption = q @ self.features.T  # [queries, captions of all examples]
            scores = torch.full((len(queries), self.num_examples), -torch.inf)
            index = self.owners.expand(len(queries), -1)
            scores = scores.scatter_reduce(1, index, per_caption, reduce="amax", include_self=True)
            return scores.numpy().astype(np.float32)
        images = torch.stack([query.image for query in queries])
        if self.backbone_name == "pixel" and images[0].numel() != self.features.shape[1]:
            raise ValueError(
                f"Query images are {tuple(images.shape[1:])} but the training images were compared at "
                f"{self.features.shape[1]} values: backbone=pixel needs queries at the data's resolution."
            )
        q = _unit(self.backbone.image_features(images.to(self.backbone.device)).cpu())
        return (q @ self.features.T).numpy().astype(np.float32)

    def config(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone_name,
            "path": self.path,
            "side": self.side,
            "weights": getattr(self, "identity", {}).get("weights"),
            "features": BACKBONES[self.backbone_name][2],
            **({"caption_reduction": "max"} if self.side == "text" else {}),
        }

    def train_side_bytes(self) -> int:
        return disk_bytes(self.store_dir) if hasattr(self, "store_dir") else 0
