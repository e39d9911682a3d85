"""The deterministic per-sample loss every training example is scored with, before and after
unlearning: fixed timesteps and noise keyed by (seed, id, caption index, timestep, flip), so the two
sweeps see identical noise and the result does not depend on batch size, order or sharding.

Examples with fewer captions than asked for get NaN in the missing caption slots (rather than a
repeated caption, which would weight some captions twice): reduce over captions with `nanmean`, as
`unlearning_scores` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusion_attribution.compute.sharded import run_sharded
from diffusion_attribution.data.base import CaptionedImageDataset
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.objective.loss import diffusion_loss, encode_captions, evaluation_mode
from diffusion_attribution.utils.seeding import keyed_randn


def _check_timesteps(timesteps: Sequence[int], num_timesteps: int) -> list[int]:
    steps = [int(t) for t in timesteps]
    if not steps:
        raise ValueError("Give at least one timestep for the per-sample loss, e.g. [0, 100, ..., 900].")
    bad = [t for t in steps if not 0 <= t < num_timesteps]
    if bad:
        raise ValueError(f"Timesteps {bad} are outside the model's range 0..{num_timesteps - 1}.")
    return steps


@torch.no_grad()
def per_sample_losses(
    model: TextToImageModel,
    dataset: CaptionedImageDataset,
    ids: Sequence[int],
    timesteps: Sequence[int],
    caption_indices: Sequence[int] | None = None,
    flips: Sequence[bool] = (False,),
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """Loss [len(ids), num_captions, len(flips)] (float32, CPU), averaged over pixels and timesteps.

    `caption_indices=None` takes every caption of each example (num_captions = the largest count
    among `ids`); a caption index an example does not have gives NaN. The noise of (id, caption
    index c, timestep t, flip f) is keyed_randn(latent shape, seed, id, c, t, f). All combinations are
    laid out in one list and run `batch_size` UNet forwards at a time; within a batch each distinct
    image is encoded once and each distinct caption is encoded once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    ids = [int(i) for i in ids]
    flips = [bool(f) for f in flips]
    if not flips:
        raise ValueError("Give at least one flip setting: (False,) or (False, True).")
    steps = _check_timesteps(timesteps, int(model.scheduler.config.num_train_timesteps))
    counts = [len(dataset.source.captions(i)) for i in ids]
    if caption_indices is None:
        slots = list(range(max(counts, default=0)))
    else:
        slots = [int(c) for c in caption_indices]
        if not slots or min(slots) < 0:
            raise ValueError("caption_indices must be non-negative integers (or None for all captions).")
    losses = torch.full((len(ids), len(slots), len(flips), len(steps)), float("nan"), dtype=torch.float64)
    # (row, slot, flip position, timestep position); the id-major order keeps an image's combinations
    # together so each batch encodes few distinct images.
    combos = [
        (row, slot, fpos, tpos)
        for row, count in enumerate(counts)
        for fpos in range(len(flips))
        for slot, caption in enumerate(slots)
        if caption < count
        for tpos in range(len(steps))
    ]
    device = model.device
    dtype = model.unet.dtype
    with evaluation_mode(model):
        for begin in tqdm(
            range(0, len(combos), batch_size), desc="per-sample loss", unit="batch", disable=not progress
        ):
            chunk = combos[begin : begin + batch_size]
            images: dict[tuple[int, int], int] = {}
            for row, _, fpos, _ in chunk:
                images.setdefault((row, fpos), len(images))
            pixels = torch.stack(
                [dataset.example(ids[row], 0, flips[fpos])["pixel_values"] for row, fpos in images]
            )
            encoded = model.encode_images(pixels.to(device, dtype))
            latents = encoded[[images[(row, fpos)] for row, _, fpos, _ in chunk]]
            noise = torch.stack(
                [
                    keyed_randn(
                        model.latent_shape, seed, ids[row], slots[slot], steps[tpos], int(flips[fpos])
                    )
                    for row, slot, fpos, tpos in chunk
                ]
            ).to(device, latents.dtype)
            t = torch.tensor([steps[tpos] for *_, tpos in chunk], dtype=torch.long, device=device)
            captions = [dataset.source.captions(ids[row])[slots[slot]] for row, slot, _, _ in chunk]
            text_states = encode_captions(model, captions)
            values = diffusion_loss(model, latents, noise, t, text_states).double().cpu()
            index = torch.tensor(chunk, dtype=torch.long).T
            losses[index[0], index[1], index[2], index[3]] = values
    return losses.mean(dim=-1).to(torch.float32)


# ----------------------------------------------------------------------------------- loss sweep
@dataclass(frozen=True)
class SweepConfig:
    """What decides the numbers of a loss sweep (and so its cache key)."""

    timesteps: tuple[int, ...]
    caption_indices: tuple[int, ...]
    flips: tuple[bool, ...] = (False,)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timesteps"] = [int(t) for t in self.timesteps]
        d["caption_indices"] = [int(c) for c in self.caption_indices]
        d["flips"] = [bool(f) for f in self.flips]
        return d


def run_loss_sweep(
    model: TextToImageModel,
    dataset: CaptionedImageDataset,
    ids: Sequence[int] | np.ndarray,
    config: SweepConfig,
    out_dir: str | Path,
    identity: dict[str, Any],
    batch_size: int = 64,
    shard_size: int = 256,
    trainer_kwargs: dict[str, Any] | None = None,
    description: str = "loss sweep",
) -> torch.Tensor:
    """Per-sample losses [len(ids), captions, flips] (see `per_sample_losses`), sharded and resumable."""

    def shard_fn(shard_ids: np.ndarray) -> dict[str, torch.Tensor]:
        losses = per_sample_losses(
            model,
            dataset,
            shard_ids.tolist(),
            timesteps=list(config.timesteps),
            caption_indices=list(config.caption_indices),
            flips=list(config.flips),
            seed=config.seed,
            batch_size=batch_size,
        )
        return {"losses": losses.float()}

    shards = run_sharded(
        model,
        shard_fn,
        ids,
        out_dir,
        {**identity, "sweep": config.to_dict()},
        shard_size,
        trainer_kwargs,
        description,
    )
    return torch.cat([s["losses"] for s in shards])
