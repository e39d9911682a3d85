"""`data=exemplars` (used by `train.py experiment=customize`): the exemplar images of a concept, in
the image-folder convention (images + metadata.jsonl/csv whose captions use the new token, e.g.
"a red <new1> on a black background"), plus optional regularisation images drawn in every batch.

Regularisation (`regularization`): null (none), "base" (the base model's own training data, read
from its checkpoint's training_config.yaml by the customize job), an image folder path, or a data
config / datamodule. `regularization_size` keeps a seeded random subset of it (Custom Diffusion uses
a few hundred real images).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader

from diffusion_attribution.data.base import (
    CaptionedImageDataModule,
    CaptionedImageDataset,
    DataError,
    collate_examples,
)
from diffusion_attribution.data.folder import FolderDataModule, ImageFolderSource


class CustomizationDataModule(pl.LightningDataModule):
    """Batches `{"exemplars": ..., "regularization": ...}` (the second only when configured); an
    epoch is as long as the longer loader, the shorter one cycles (Lightning's max_size_cycle)."""

    def __init__(
        self,
        exemplars: str,
        metadata: str | None = None,
        regularization: Any = None,
        regularization_size: int | None = None,
        regularization_seed: int = 0,
        resolution: int = 32,
        batch_size: int = 4,
        regularization_batch_size: int | None = None,
        num_workers: int = 0,
        random_flip: bool = False,
        cache_images: bool = True,
        sample_prompts: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.exemplar_root = exemplars
        self.metadata = metadata
        self.regularization_spec = regularization
        self.regularization_size = regularization_size
        self.regularization_seed = regularization_seed
        self.resolution = resolution
        self.batch_size = batch_size
        self.regularization_batch_size = regularization_batch_size or batch_size
        self.num_workers = num_workers
        self.random_flip = random_flip
        self.cache_images = cache_images
        self.sample_prompts = list(sample_prompts or [])
        self._source: ImageFolderSource | None = None
        self._regularization: CaptionedImageDataset | None | bool = False  # False: not built yet

    @property
    def source(self) -> ImageFolderSource:
        """The exemplars (their captions give the tokens' context)."""
        if self._source is None:
            self._source = ImageFolderSource(self.exemplar_root, self.metadata)
        return self._source

    @property
    def exemplar_dataset(self) -> CaptionedImageDataset:
        return CaptionedImageDataset(self.source, self.resolution, None, self.random_flip, self.cache_images)

    @property
    def regularization_dataset(self) -> CaptionedImageDataset | None:
        if self._regularization is False:
            self._regularization = self._build_regularization()
        return self._regularization  # type: ignore[return-value]

    def _build_regularization(self) -> CaptionedImageDataset | None:
        spec = self.regularization_spec
        if spec is None or (isinstance(spec, str) and not spec.strip()):
            return None
        if isinstance(spec, str) and spec == "base":
            raise DataError(
                "data.regularization=base is resolved by the customize job from the base checkpoint's "
                "training_config.yaml; build this datamodule through train.py experiment=customize, or "
                "give a data config / image folder instead."
            )
        if isinstance(spec, str):
            datamodule: CaptionedImageDataModule = FolderDataModule(root=spec, resolution=self.resolution)
        elif isinstance(spec, CaptionedImageDataModule):
            datamodule = spec
        else:
            import hydra

            datamodule = hydra.utils.instantiate(spec)
        if datamodule.resolution != self.resolution:
            raise DataError(
                f"The regularisation data has resolution {datamodule.resolution}, the exemplars "
                f"{self.resolution}: give the regularisation data the model's resolution."
            )
        ids = np.asarray(datamodule.train_ids)
        if self.regularization_size is not None and self.regularization_size < len(ids):
            rng = np.random.default_rng(self.regularization_seed)
            ids = np.sort(rng.choice(ids, size=int(self.regularization_size), replace=False))
        return CaptionedImageDataset(
            datamodule.source, self.resolution, ids, self.random_flip, self.cache_images
        )

    def setup(self, stage: str | None = None) -> None:
        if len(self.source) == 0:
            raise DataError(f"{self.exemplar_root} has no exemplar images.")

    def _loader(self, dataset: CaptionedImageDataset, batch_size: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=min(batch_size, len(dataset)),
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            collate_fn=collate_examples,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> dict[str, DataLoader]:
        loaders = {"exemplars": self._loader(self.exemplar_dataset, self.batch_size)}
        regularization = self.regularization_dataset
        if regularization is not None:
            loaders["regularization"] = self._loader(regularization, self.regularization_batch_size)
        return loaders
