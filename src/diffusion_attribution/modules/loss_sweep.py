"""The deterministic per-sample loss every training example is scored with, before and after
unlearning: fixed timesteps and noise keyed by (seed, id, caption index, timestep, flip), so the two
sweeps see identical noise and the result does not depend on batch size, order or sharding.

Examples with fewer captions than asked for get NaN in the missing caption slots (rather than a
repeated caption, which would weight some captions twice): reduce over captions with `nanmean`, as
`unlearning_scores` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..data.base import CaptionedImageDataset
from ..models.pipeline import TextToImageModel
from ..utils.seeding import keyed_randn
from .fisher import encode_captions, evaluation_mode, squared_error

FLIP_REDUCTIONS = ("max", "mean", "min")
# How an example's loss change becomes its score. "difference": after − before, the paper's score.
# "log_ratio": log(after / before), the relative rise: an example the model fits closely (a low loss,
# e.g. a customized model's own exemplars) counts its rise against that loss, and examples whose
# loss is high everywhere (busy images) no longer win by their scale alone.
SCORES = ("difference", "log_ratio")


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
            prediction = model.predict(model.add_noise(latents, noise, t), t, text_states)
            values = squared_error(prediction, model.target(latents, noise, t)).double().cpu()
            index = torch.tensor(chunk, dtype=torch.long).T
            losses[index[0], index[1], index[2], index[3]] = values
    return losses.mean(dim=-1).to(torch.float32)


def reduce_flips(losses: torch.Tensor, how: str = "max") -> torch.Tensor:
    """Reduce the last (flip) dimension: 'max' (the paper: score flipped and unflipped images, keep
    the higher), 'mean' or 'min'."""
    if how not in FLIP_REDUCTIONS:
        raise ValueError(f"Unknown flip reduction {how!r}; options: {FLIP_REDUCTIONS}.")
    if how == "max":
        return losses.max(dim=-1).values
    if how == "min":
        return losses.min(dim=-1).values
    return losses.mean(dim=-1)


def unlearning_scores(
    before: torch.Tensor, after: torch.Tensor, flip_reduction: str = "max", score: str = "difference"
) -> torch.Tensor:
    """Attribution scores [num_examples] from two sweeps [num_examples, captions, flips]: the loss
    change (after − before, or log(after / before) with score="log_ratio"; see SCORES) averaged over
    the captions each example has (NaN slots skipped), then reduced over flips. Higher = more
    influential."""
    if score not in SCORES:
        raise ValueError(f"Unknown unlearning score {score!r}; options: {SCORES}.")
    if before.shape != after.shape:
        raise ValueError(f"Loss sweeps differ in shape: {tuple(before.shape)} vs {tuple(after.shape)}.")
    if before.dim() != 3:
        raise ValueError("Expected loss sweeps of shape [num_examples, num_captions, num_flips].")
    before, after = before.double(), after.double()
    if score == "log_ratio":  # a loss of exactly 0 would give log 0; the smallest double stands in
        tiny = torch.finfo(torch.float64).tiny
        change = after.clamp_min(tiny).log() - before.clamp_min(tiny).log()
    else:
        change = after - before
    per_flip = torch.nanmean(change, dim=1)
    return reduce_flips(per_flip, flip_reduction).to(torch.float32)
