"""The per-sample loss sweep over a whole training set as a Lightning `predict` loop.

The ids are cut into fixed shards; the predict dataloader yields shard numbers, so DDP spreads shards
over processes by id. Each shard is written atomically (temporary file, then rename) as soon as it is
done, and a shard already on disk is never recomputed: a killed sweep resumes where it stopped, and a
sweep cached for a (model, data, sweep config) is shared by every query that needs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ..data.base import CaptionedImageDataset
from ..models.pipeline import TextToImageModel
from .loss_sweep import per_sample_losses

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepConfig:
    """What decides the numbers of a sweep (and hence its cache key)."""

    timesteps: tuple[int, ...]
    caption_indices: tuple[int, ...] | None = None  # None: every caption of each example
    flips: tuple[bool, ...] = (False,)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timesteps"] = [int(t) for t in self.timesteps]
        d["caption_indices"] = (
            None if self.caption_indices is None else [int(c) for c in self.caption_indices]
        )
        d["flips"] = [bool(f) for f in self.flips]
        return d


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _ShardNumbers(torch.utils.data.Dataset):
    def __init__(self, shards: Sequence[int]) -> None:
        self.shards = list(shards)

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, k: int) -> int:
        return self.shards[k]


class LossSweepModule(pl.LightningModule):
    """predict_step(shard number) computes that shard's losses and writes them to disk."""

    def __init__(
        self,
        model: TextToImageModel,
        dataset: CaptionedImageDataset,
        ids: np.ndarray,
        config: SweepConfig,
        out_dir: Path,
        shard_size: int,
        batch_size: int,
    ) -> None:
        super().__init__()
        self.model = model
        self.dataset = dataset
        self.ids = ids
        self.config = config
        self.out_dir = out_dir
        self.shard_size = shard_size
        self.batch_size = batch_size

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        for shard in batch.tolist():
            path = shard_path(self.out_dir, shard)
            if path.is_file():  # written by another process (DDP padding) or an earlier run
                continue
            ids = self.ids[shard * self.shard_size : (shard + 1) * self.shard_size]
            losses = per_sample_losses(
                self.model,
                self.dataset,
                ids,
                timesteps=list(self.config.timesteps),
                caption_indices=None
                if self.config.caption_indices is None
                else list(self.config.caption_indices),
                flips=list(self.config.flips),
                seed=self.config.seed,
                batch_size=self.batch_size,
            )
            atomic_save_npy(path, losses.detach().cpu().numpy().astype(np.float32))


def shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / f"shard_{shard:06d}.npy"


def run_loss_sweep(
    model: TextToImageModel,
    dataset: CaptionedImageDataset,
    ids: np.ndarray,
    config: SweepConfig,
    out_dir: str | Path,
    trainer_kwargs: dict[str, Any] | None = None,
    shard_size: int = 256,
    batch_size: int = 64,
    description: str = "loss sweep",
) -> np.ndarray:
    """Losses [len(ids), captions, flips] for `ids`, computed shard by shard (resuming from `out_dir`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = np.asarray(ids, dtype=np.int64)
    meta = {"config": config.to_dict(), "ids_sha": _ids_digest(ids), "shard_size": shard_size}
    meta_path = out_dir / "sweep.json"
    if meta_path.is_file():
        existing = json.loads(meta_path.read_text())
        if existing != meta:
            raise ValueError(
                f"{out_dir} holds a sweep made with other settings ({existing}); refusing to mix shards. "
                "Use another cache directory or delete that folder."
            )
    else:
        atomic_write_text(meta_path, json.dumps(meta, indent=2))
    num_shards = (len(ids) + shard_size - 1) // shard_size
    todo = [s for s in range(num_shards) if not shard_path(out_dir, s).is_file()]
    if todo:
        log.info("%s: %d of %d shards to compute in %s", description, len(todo), num_shards, out_dir)
        module = LossSweepModule(model, dataset, ids, config, out_dir, shard_size, batch_size)
        kwargs = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False}
        kwargs.update(trainer_kwargs or {})
        trainer = pl.Trainer(**kwargs)
        loader = DataLoader(_ShardNumbers(todo), batch_size=1, shuffle=False)
        trainer.predict(module, loader, return_predictions=False)
        trainer.strategy.barrier()
    return np.concatenate([np.load(shard_path(out_dir, s)) for s in range(num_shards)], axis=0)


def _ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(ids).tobytes()).hexdigest()[:16]
