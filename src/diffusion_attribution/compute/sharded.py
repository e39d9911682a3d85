"""Per-example work over a whole training set (the loss sweep, the Fisher) as a Lightning `predict`
loop over shards of ids.

The ids are cut into fixed shards; the predict dataloader yields shard numbers, so DDP spreads shards
over processes by id. Each shard's result is written atomically (temporary file, then rename) as soon
as it is done, and a shard already on disk is never recomputed: a killed sweep resumes where it
stopped, and a sweep cached for a (model, data, config) is shared by every query that needs it. Shard
results depend only on their ids (all randomness is keyed per example), so the combined result is the
same for any number of processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from diffusion_attribution.utils.atomic import atomic_save_tensors, atomic_write_text

log = logging.getLogger(__name__)


ShardFn = Callable[[np.ndarray], dict[str, torch.Tensor]]


def shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / f"shard_{shard:06d}.safetensors"


class _ShardNumbers(torch.utils.data.Dataset):
    def __init__(self, shards: Sequence[int]) -> None:
        self.shards = list(shards)

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, k: int) -> int:
        return self.shards[k]


class SweepInterrupted(SIGTERMException):
    """A sharded sweep stopped by SIGTERM between two shards (a SystemExit: the process ends with
    status 1 and the message; rerunning resumes)."""


class ShardedPredictModule(pl.LightningModule):
    """predict_step(shard numbers): compute each missing shard with `shard_fn` and write it."""

    def __init__(
        self, model: nn.Module, shard_fn: ShardFn, ids: np.ndarray, out_dir: Path, shard_size: int
    ) -> None:
        super().__init__()
        self.model = model  # a submodule, so that Lightning moves it to the process's device
        self.shard_fn = shard_fn
        self.ids = ids
        self.out_dir = out_dir
        self.shard_size = shard_size

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        for shard in batch.tolist():
            path = shard_path(self.out_dir, shard)
            if path.is_file():  # done by an earlier run, or by another process (sampler padding)
                continue
            # Lightning's predict loop records a SIGTERM (SLURM preemption, scancel, kill) but, unlike
            # its fit loop, never acts on it; stop between shards so the written ones are kept.
            if self.trainer.received_sigterm:
                raise SweepInterrupted(
                    f"SIGTERM received: stopped before shard {shard}; the finished shards are kept in "
                    f"{self.out_dir}. Run the same command again to resume from them."
                )
            ids = self.ids[shard * self.shard_size : (shard + 1) * self.shard_size]
            atomic_save_tensors(path, self.shard_fn(ids))


def run_sharded(
    model: nn.Module,
    shard_fn: ShardFn,
    ids: Sequence[int] | np.ndarray,
    out_dir: str | Path,
    identity: dict[str, Any],
    shard_size: int = 256,
    trainer_kwargs: dict[str, Any] | None = None,
    description: str = "sweep",
) -> list[dict[str, torch.Tensor]]:
    """Run `shard_fn` over `ids` in shards (resuming from `out_dir`) and return every shard's result.

    `identity` says what made the numbers (model, data, config); a folder holding shards made with a
    different identity is refused rather than mixed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = np.asarray(ids, dtype=np.int64)
    meta = {
        "identity": json.loads(json.dumps(identity, default=str)),
        "ids_sha1": hashlib.sha1(np.ascontiguousarray(ids).tobytes()).hexdigest()[:16],
        "num_ids": len(ids),
        "shard_size": shard_size,
    }
    meta_path = out_dir / "sweep.json"
    if meta_path.is_file():
        existing = json.loads(meta_path.read_text())
        if existing != meta:
            raise ValueError(
                f"{out_dir} already holds results of a different run ({existing.get('identity')}); refusing to "
                "mix them. Point the run at another directory (a new Hydra run dir, or another cache_dir)."
            )
    else:
        atomic_write_text(meta_path, json.dumps(meta, indent=2))
    num_shards = (len(ids) + shard_size - 1) // shard_size
    todo = [s for s in range(num_shards) if not shard_path(out_dir, s).is_file()]
    if todo:
        log.info("%s: %d of %d shards to compute (%s)", description, len(todo), num_shards, out_dir)
        module = ShardedPredictModule(model, shard_fn, ids, out_dir, shard_size)
        kwargs: dict[str, Any] = {
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "accelerator": "auto",
            "devices": 1,
        }
        kwargs.update(trainer_kwargs or {})
        trainer = pl.Trainer(**kwargs)
        loader = DataLoader(_ShardNumbers(todo), batch_size=1, shuffle=False)
        trainer.predict(module, loader, return_predictions=False)
        trainer.strategy.barrier()
    else:
        log.info("%s: all %d shards found in %s", description, num_shards, out_dir)
    return [load_file(shard_path(out_dir, s)) for s in range(num_shards)]
