"""The train side of TRAK-style methods on disk: the projected features Φ of every example, written
shard by shard as float32 .npy files beside the sharded loop's markers (compute/sharded.py), read back
memory-mapped one shard at a time (never all of Φ in memory), plus the cached kernel factors.

A store belongs to one (model, data, train-side settings); `check` refuses a folder made for anything
else with a message that says what differs and what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion_attribution.attribution.base import disk_bytes


class TrainSideMismatchError(ValueError):
    """A train-side store on disk that was made for another model, data or setting."""


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


class FeatureStore:
    """Φ of a method's train side under `root` (`identity`: model, data and train-side settings)."""

    PARTS = {"model": "model weights", "data": "training data", "train_side": "method settings"}

    def __init__(self, root: Path, identity: dict[str, Any], shard_size: int, dim: int, method: str) -> None:
        self.root = Path(root)
        self.identity = identity
        self.shard_size = shard_size
        self.dim = dim
        self.method = method

    def check(self) -> None:
        """Refuse a store made for another model/data/setting, naming what differs (the sharded loop
        would refuse it too, but could not say why)."""
        meta_path = self.root / "sweep.json"
        if not meta_path.is_file():
            return
        existing = json.loads(meta_path.read_text())
        old, new = existing.get("identity", {}), _plain(self.identity)
        if old != new:
            differing = [part for part in self.PARTS if old.get(part) != new.get(part)]
            detail = ""
            if "train_side" in differing:
                changed = sorted(
                    k
                    for k in set(old.get("train_side", {})) | set(new["train_side"])
                    if old.get("train_side", {}).get(k) != new["train_side"].get(k)
                )
                detail = f" (settings that differ: {changed})"
            raise TrainSideMismatchError(
                f"The {self.method} train-side store {self.root} holds projected gradients of other "
                f"{' and '.join(self.PARTS[d] for d in differing)}{detail}: they cannot score this model's "
                "queries. Delete that folder to recompute it for this model, or set method.store_dir to a new "
                "folder (or leave method.store_dir unset: stores are then kept under cache_dir, one per model, "
                "data and settings)."
            )
        if existing.get("shard_size") != self.shard_size:
            raise TrainSideMismatchError(
                f"The train-side store {self.root} was written in shards of {existing.get('shard_size')} "
                f"examples: set method.shard_size={existing.get('shard_size')} to reuse (or resume) it."
            )

    def feature_path(self, shard: int) -> Path:
        return self.root / f"features_{shard:06d}.npy"

    def write(self, shard: int, features: torch.Tensor) -> None:
        """One shard's Φ rows, written atomically (a killed run never leaves a truncated file)."""
        path = self.feature_path(shard)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, features.numpy())
        os.replace(tmp, path)

    def iter_features(self, shards: Sequence[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(ids, Φ rows [len(ids), k] float32), one memory-mapped shard at a time."""
        for shard, ids in enumerate(shards):
            path = self.feature_path(shard)
            if not path.is_file():
                raise TrainSideMismatchError(
                    f"{path} is missing although its shard marker exists: the store {self.root} is incomplete. "
                    "Delete the folder to recompute it."
                )
            features = np.load(path, mmap_mode="r")
            if features.shape != (len(ids), self.dim):
                raise TrainSideMismatchError(
                    f"{path} holds {features.shape} features; expected {(len(ids), self.dim)}. The "
                    "store is corrupt: delete it to recompute."
                )
            yield ids, torch.from_numpy(np.array(features))  # this shard only, copied out of the map

    def kernel_path(self, key: str) -> Path:
        return self.root / f"kernel_{key}.safetensors"

    def bytes(self, *extra: Path) -> int:
        files = [self.root / "sweep.json", *extra]
        files += list(self.root.glob("shard_*.safetensors")) + list(self.root.glob("features_*.npy"))
        return disk_bytes(*files)
