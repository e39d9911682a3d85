"""Per-example work over a whole training set (the loss sweep, the Fisher) as a Lightning `predict`
loop over shards of ids.

The ids are cut into fixed shards; the predict dataloader yields shard numbers, so DDP spreads shards
over processes by id. Each shard's result is written atomically (temporary file, then rename) as soon
as it is done, and a shard already on disk is never recomputed: a killed sweep resumes where it
stopped, and a sweep cached for a (model, data, config) is shared by every query that needs it. Shard
results depend only on their ids (all randomness is keyed per example), so the combined result is the
same for any number of processes.

Every shard carries a checksum of its contents (utils/atomic.py); a shard that no longer matches it
(truncated, overwritten) is recomputed with a warning rather than used. A SIGTERM (SLURM preemption)
stops the sweep within one module call of the shard in progress: that partial shard is discarded and
the finished ones are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DataLoader

from diffusion_attribution.utils.atomic import (
    CorruptFileError,
    atomic_save_tensors,
    atomic_write_text,
    load_checked_tensors,
)

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
    """A sharded sweep stopped by SIGTERM (a SystemExit: the process ends with status 1 and the
    message; rerunning resumes from the finished shards)."""


class ShardStopped(Exception):
    """Raised inside a shard function when a stop (SIGTERM) was requested; its partial shard is dropped."""


# The stop check of the shard being computed in this process (None outside a shard).
_active_stop_check: Callable[[], bool] | None = None


def stop_requested() -> bool:
    """Whether the sweep this shard belongs to was asked to stop (SIGTERM); False outside a sweep."""
    return bool(_active_stop_check is not None and _active_stop_check())


def check_stop() -> None:
    """For shard functions with their own loops: raise ShardStopped if the sweep was asked to stop.
    (Every call of the model's parts inside a shard checks this already; see `_stopping_within_shard`.)"""
    if stop_requested():
        raise ShardStopped()


@contextlib.contextmanager
def _stopping_within_shard(should_stop: Callable[[], bool], model: nn.Module) -> Iterator[None]:
    """While a shard is computed, every call of the model's top-level parts (UNet, text encoder, VAE:
    once per batch) first checks `should_stop`, so a SIGTERM stops the work within one batch, whatever
    loop the shard function runs. The hooks sit on those parts only, not on every layer's call."""
    global _active_stop_check
    previous = _active_stop_check
    _active_stop_check = should_stop

    def hook(module: nn.Module, args: Any) -> None:
        check_stop()

    parts = list(model.children()) or [model]
    handles = [part.register_forward_pre_hook(hook) for part in parts]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        _active_stop_check = previous


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

    def _received_sigterm(self) -> bool:
        return bool(self.trainer.received_sigterm)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        for shard in batch.tolist():
            path = shard_path(self.out_dir, shard)
            if path.is_file():  # done by an earlier run, or by another process (sampler padding)
                continue
            # Lightning's predict loop records a SIGTERM (SLURM preemption, scancel, kill) but, unlike
            # its fit loop, never acts on it: check it between shards and, during one, before every
            # module call, so that the process stops within one batch and the written shards are kept.
            if self._received_sigterm():
                raise SweepInterrupted(
                    f"SIGTERM received: stopped before shard {shard}; the finished shards are kept in "
                    f"{self.out_dir}. Run the same command again to resume from them."
                )
            ids = self.ids[shard * self.shard_size : (shard + 1) * self.shard_size]
            try:
                with _stopping_within_shard(self._received_sigterm, self.model):
                    result = self.shard_fn(ids)
            except ShardStopped:
                raise SweepInterrupted(
                    f"SIGTERM received: stopped during shard {shard} (its partial work is discarded); the "
                    f"finished shards are kept in {self.out_dir}. Run the same command again to resume "
                    "from them."
                ) from None
            atomic_save_tensors(path, result)


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs between two JSON-like values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{where}.{key}" if where else str(key)
            if key not in old:
                out.append(f"{name}: (absent) -> {new[key]!r}")
            elif key not in new:
                out.append(f"{name}: {old[key]!r} -> (absent)")
            else:
                out += _differences(old[key], new[key], name)
        return out
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def _check_folder(out_dir: Path, meta_path: Path, meta: dict[str, Any]) -> int:
    """Compare the folder's sweep.json with this run's; return the shard size to use. A folder made
    with another identity or other ids is refused, naming every key that differs. One that differs only
    in shard_size keeps its own (results do not depend on the shard size), so no finished shard is lost."""
    existing = json.loads(meta_path.read_text())
    old_rest = {k: v for k, v in existing.items() if k != "shard_size"}
    new_rest = {k: v for k, v in meta.items() if k != "shard_size"}
    if old_rest != new_rest:
        changed = _differences(old_rest, new_rest)
        raise ValueError(
            f"{out_dir} already holds results of a different run (its sweep.json differs in: "
            f"{'; '.join(changed)}); refusing to mix them. Point the run at another directory (a new Hydra "
            "run dir, or another cache_dir), or run with the settings recorded there."
        )
    old_size = int(existing.get("shard_size", meta["shard_size"]))
    if old_size != meta["shard_size"]:
        log.warning(
            "%s was written in shards of %d ids; this run asked for shard_size %d -> keeping %d, so the "
            "finished shards are reused (results do not depend on the shard size). For shards of %d, use "
            "another directory.",
            out_dir,
            old_size,
            meta["shard_size"],
            old_size,
            meta["shard_size"],
        )
    return old_size


def _load_finished(out_dir: Path, num_shards: int) -> dict[int, dict[str, torch.Tensor]]:
    """The shards on disk whose checksums hold; a damaged one is deleted (it is a cache) with a warning,
    so that it is recomputed."""
    finished: dict[int, dict[str, torch.Tensor]] = {}
    for shard in range(num_shards):
        path = shard_path(out_dir, shard)
        if not path.is_file():
            continue
        try:
            finished[shard] = load_checked_tensors(path, "It is recomputed.", require_checksum=False)[0]
        except CorruptFileError as error:
            log.warning("%s is corrupt (%s): recomputing it.", path, error.reason)
            path.unlink(missing_ok=True)
    return finished


def _on_cuda(model: nn.Module) -> bool:
    """Whether the model's first parameter or buffer is on a GPU (a module with neither: no)."""
    tensor = next(model.parameters(), None)
    tensor = next(model.buffers(), None) if tensor is None else tensor
    return tensor is not None and tensor.device.type == "cuda"


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
    different identity is refused rather than mixed (the message names the keys that differ). A folder
    written with another shard size is resumed in its own shard size. Shards whose checksum fails are
    recomputed. `shard_fn` may call `check_stop()` between batches; every module call checks it too.
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
        shard_size = _check_folder(out_dir, meta_path, meta)
    else:
        atomic_write_text(meta_path, json.dumps(meta, indent=2))
    num_shards = (len(ids) + shard_size - 1) // shard_size
    finished = _load_finished(out_dir, num_shards)
    todo = [s for s in range(num_shards) if s not in finished]
    if todo:
        log.info("%s: %d of %d shards to compute (%s)", description, len(todo), num_shards, out_dir)
        module = ShardedPredictModule(model, shard_fn, ids, out_dir, shard_size)
        kwargs: dict[str, Any] = {
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            # Without the job's trainer settings, stay where the model is (never a silent move to a GPU).
            "accelerator": "gpu" if _on_cuda(model) else "cpu",
            "devices": 1,
        }
        kwargs.update(trainer_kwargs or {})
        trainer = pl.Trainer(**kwargs)
        loader = DataLoader(_ShardNumbers(todo), batch_size=1, shuffle=False)
        trainer.predict(module, loader, return_predictions=False)
        trainer.strategy.barrier()
    else:
        log.info("%s: all %d shards found in %s", description, num_shards, out_dir)
    fix = f"Delete it and run again to recompute the shard (or delete {out_dir} to recompute the sweep)."
    for shard in todo:
        finished[shard] = load_checked_tensors(shard_path(out_dir, shard), fix)[0]
    return [finished[s] for s in range(num_shards)]
