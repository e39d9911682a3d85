"""Training whose every random choice is keyed by what it is for (`training.example_keyed_rng=true`).

In plain training the batches, the noise, the timesteps, the caption choice and caption dropout all
come from the global RNG stream, so a run resumed from a checkpoint continues with other numbers than
the uninterrupted run would have drawn, and a leave-K-out retrain shares no random numbers with the
original. Here:

- the data order of epoch e is a permutation of *all* ids keyed by (seed, e), with the excluded ids
  filtered out: a retrain visits the remaining examples in the original's relative order (batch
  boundaries shift by the removed examples only);
- example i's caption index, flip, noise, timestep and caption dropout in epoch e come from a generator
  keyed by (seed, e, i): an example gets the same draws in the retrain as in the original;
- the loader starts at the trainer's global step (epoch = step // batches per epoch), so a run resumed
  from any checkpoint continues with exactly the batches and draws of the uninterrupted run, and
  finishes with the same weights.

These common random numbers are what "same recipe and seed" should mean for leave-K-out: the retrain
differs from the original only by the removed examples, which keeps the noise of ΔL low.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from diffusion_attribution.data.base import (
    CaptionedImageDataModule,
    CaptionedImageDataset,
    DataError,
    collate_examples,
)
from diffusion_attribution.training.module import DiffusionTrainingModule
from diffusion_attribution.utils.seeding import Stream, keyed_generator

# Key prefixes: the data order, an example's loading draws and its loss draws never share a stream.


def epoch_order(seed: int, epoch: int, num_examples: int, kept: np.ndarray) -> np.ndarray:
    """Epoch `epoch`'s visiting order of the kept ids: a keyed permutation of every id, filtered."""
    permutation = torch.randperm(
        num_examples, generator=keyed_generator(seed, Stream.TRAINING_ORDER, epoch)
    ).numpy()
    keep = np.zeros(num_examples, dtype=bool)
    keep[kept] = True
    return permutation[keep[permutation]]


class KeyedExamples(Dataset):
    """Items are (epoch, id) keys; caption index and flip are drawn from the example's own generator."""

    def __init__(self, dataset: CaptionedImageDataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, idx = key
        generator = keyed_generator(self.seed, Stream.TRAINING_EXAMPLE, epoch, idx)
        num_captions = len(self.dataset.source.captions(idx))
        caption_index = int(torch.randint(num_captions, (), generator=generator))
        flip = bool(torch.rand((), generator=generator) < 0.5) and self.dataset.random_flip
        return {**self.dataset.example(idx, caption_index, flip), "epoch": epoch}


def collate_keyed(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return {**collate_examples(batch), "epoch": torch.tensor([b["epoch"] for b in batch], dtype=torch.long)}


class StepPositionedBatches(Sampler[list[tuple[int, int]]]):
    """Batches of (epoch, id) keys, drop_last. Each `iter()` starts at the bound trainer's global
    step, so a resumed run (or the next epoch) continues exactly where the step count says."""

    def __init__(
        self,
        seed: int,
        num_examples: int,
        kept: np.ndarray,
        batch_size: int,
        trainer: pl.Trainer | None = None,
    ) -> None:
        self.seed = seed
        self.num_examples = num_examples
        self.kept = np.asarray(kept, dtype=np.int64)
        self.batch_size = batch_size
        self.trainer = trainer
        self.batches_per_epoch = len(self.kept) // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"Only {len(self.kept)} examples remain, fewer than one batch of {batch_size}: lower "
                "data.batch_size or exclude fewer examples."
            )

    def __len__(self) -> int:
        return self.batches_per_epoch

    def batches_of_epoch(self, epoch: int) -> list[list[tuple[int, int]]]:
        order = epoch_order(self.seed, epoch, self.num_examples, self.kept)
        size = self.batch_size
        return [
            [(epoch, int(i)) for i in order[b * size : (b + 1) * size]] for b in range(self.batches_per_epoch)
        ]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = int(self.trainer.global_step) if self.trainer is not None else 0
        epoch, offset = divmod(step, self.batches_per_epoch)
        yield from self.batches_of_epoch(epoch)[offset:]


class StepPositionedLoader(DataLoader):
    """A DataLoader over StepPositionedBatches. Its position is the trainer's global step (restored
    from the checkpoint), so there is no loader state to save; the (empty) state_dict tells Lightning
    that a mid-epoch resume is exact (otherwise it warns that the loader is not resumable)."""

    def bind(self, trainer: pl.Trainer) -> None:
        self.batch_sampler.trainer = trainer  # type: ignore[union-attr]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def keyed_train_dataloader(datamodule: CaptionedImageDataModule, seed: int) -> StepPositionedLoader:
    """The training loader of `datamodule` (its exclusions and batch size) with keyed draws."""
    datamodule.setup("fit")  # refuses an exclusion that removes everything
    dataset = datamodule.dataset
    batches = StepPositionedBatches(
        seed, datamodule.num_examples, dataset.ids, min(datamodule.batch_size, len(dataset))
    )
    return StepPositionedLoader(
        KeyedExamples(dataset, seed),
        batch_sampler=batches,
        num_workers=datamodule.num_workers,
        collate_fn=collate_keyed,
        persistent_workers=datamodule.num_workers > 0,
    )


class ExampleKeyedTrainingModule(DiffusionTrainingModule):
    """DiffusionTrainingModule whose noise, timestep and caption dropout of example i in epoch e come
    from a generator keyed by (seed, e, i) (batches from `keyed_train_dataloader` carry `epoch`)."""

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = int(seed)

    def training_randomness(
        self, batch: dict[str, Any], latents: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        if "epoch" not in batch:
            raise ValueError(
                "ExampleKeyedTrainingModule needs batches from keyed_train_dataloader (they carry each "
                "example's epoch); use it with training.example_keyed_rng=true in jobs/train.py."
            )
        num_timesteps = int(self.model.scheduler.config.num_train_timesteps)
        noises, timesteps, captions = [], [], []
        for epoch, idx, caption in zip(
            batch["epoch"].tolist(), batch["id"].tolist(), batch["caption"], strict=True
        ):
            generator = keyed_generator(self.seed, Stream.TRAINING_LOSS, epoch, idx)
            noises.append(torch.randn(tuple(latents.shape[1:]), generator=generator))
            timesteps.append(int(torch.randint(num_timesteps, (), generator=generator)))
            dropped = bool(torch.rand((), generator=generator) < self.caption_dropout)
            captions.append("" if dropped else caption)
        noise = torch.stack(noises).to(latents.device, latents.dtype)
        return noise, torch.tensor(timesteps, dtype=torch.long, device=latents.device), captions
