"""The UNet's inputs of the loss sweeps, computed once per (model, data): the clean inputs of every
example under each flip (the VAE posterior mean of latent models, the pixels of pixel models) and the
text encoder's states of each of its captions.

Unlearning changes UNet weights only, so every sweep of a model (before unlearning, and after each
query's unlearning) reads the same inputs: the cache saves the image decoding, the VAE and the text
encoder of every sweep but the first. It is computed in resumable shards (compute/sharded.py) and keyed
by a fingerprint of the VAE and text encoder weights, the data and the settings, so a model whose text
encoder or VAE differs never reads another's inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion_attribution.compute.sharded import run_sharded
from diffusion_attribution.data.base import CaptionedImageDataset
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.utils.fingerprint import hash_json, module_fingerprint

log = logging.getLogger(__name__)

# method.input_cache_dtype -> the dtype the cache holds the inputs in
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SweepInputs:
    """Clean inputs [n, flips, C, H, W] and text states [n, captions, L, D] of examples `ids` [n]
    (sorted), under `flips` and for caption indices `caption_indices`; a caption an example does not
    have holds zeros (the sweep never reads it)."""

    ids: torch.Tensor
    flips: tuple[bool, ...]
    caption_indices: tuple[int, ...]
    inputs: torch.Tensor
    text_states: torch.Tensor
    path: Path | None = None  # the cache's directory, when it was read from one

    def rows(self, ids: Sequence[int]) -> torch.Tensor:
        """Positions [len(ids)] of `ids` in the cache; refuses ids it does not hold."""
        wanted = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        rows = torch.searchsorted(self.ids, wanted).clamp(max=max(len(self.ids) - 1, 0))
        missing = wanted[
            (self.ids[rows] != wanted) if len(self.ids) else torch.ones_like(wanted, dtype=torch.bool)
        ]
        if len(missing):
            raise KeyError(f"The sweep's input cache holds no inputs for ids {missing[:10].tolist()}.")
        return rows

    @property
    def nbytes(self) -> int:
        return self.inputs.nbytes + self.text_states.nbytes

    def to(self, device: torch.device | str) -> SweepInputs:
        """The same inputs held on `device` (the sweep indexes them where they are)."""
        return replace(self, inputs=self.inputs.to(device), text_states=self.text_states.to(device))

    def flip_positions(self, flips: Sequence[bool]) -> torch.Tensor:
        return _positions("flips", [bool(f) for f in flips], list(self.flips))

    def caption_positions(self, caption_indices: Sequence[int]) -> torch.Tensor:
        return _positions("caption indices", [int(c) for c in caption_indices], list(self.caption_indices))


def resident_inputs(
    inputs: SweepInputs, device: torch.device, free_bytes: int | None = None, fraction: float = 0.5
) -> SweepInputs:
    """The cache moved to the model's accelerator when it takes at most `fraction` of the device's free
    memory (`free_bytes`; on CUDA read from the device), so that a sweep gathers each batch there
    instead of copying it from the host; otherwise (and on the CPU) left where it is and streamed."""
    if device.type == "cpu":
        return inputs
    if free_bytes is None:
        if device.type != "cuda":
            return inputs
        free_bytes = torch.cuda.mem_get_info(device)[0]
    if inputs.nbytes > fraction * free_bytes:
        log.info(
            "Sweep input cache: %.2f GB stays on the host and is streamed per batch (more than %.0f%% of "
            "the %.2f GB free on %s)",
            inputs.nbytes / 1e9,
            100 * fraction,
            free_bytes / 1e9,
            device,
        )
        return inputs
    log.info("Sweep input cache: %.2f GB held on %s for the sweeps", inputs.nbytes / 1e9, device)
    return inputs.to(device)


def _positions(what: str, wanted: list[Any], held: list[Any]) -> torch.Tensor:
    absent = [w for w in wanted if w not in held]
    if absent:
        raise KeyError(f"The sweep's input cache was computed for {what} {held}, not {absent}.")
    return torch.tensor([held.index(w) for w in wanted], dtype=torch.long)


@torch.no_grad()
def encode_inputs(
    model: TextToImageModel,
    dataset: CaptionedImageDataset,
    ids: Sequence[int],
    flips: Sequence[bool],
    caption_indices: Sequence[int],
    batch_size: int = 64,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """{"inputs": [n, F, C, H, W], "text_states": [n, S, L, D]} of examples `ids` (on CPU, in `dtype`),
    computed exactly as the sweep computes them without a cache: images through `model.encode_images`
    (the posterior mean), captions through `model.encode_text`, `batch_size` at a time."""
    ids = [int(i) for i in ids]
    flips = [bool(f) for f in flips]
    caption_indices = [int(c) for c in caption_indices]
    device, model_dtype = model.device, model.unet.dtype
    images = [(i, f) for i in ids for f in flips]
    encoded = []
    for begin in range(0, len(images), batch_size):
        pixels = torch.stack(
            [dataset.example(i, 0, f)["pixel_values"] for i, f in images[begin : begin + batch_size]]
        )
        encoded.append(model.encode_images(pixels.to(device, model_dtype)).to("cpu", dtype))
    inputs = torch.cat(encoded).view(len(ids), len(flips), *model.latent_shape)
    slots = [
        (row, k, caption)
        for row, i in enumerate(ids)
        for k, caption in enumerate(_captions(dataset, i, caption_indices))
    ]
    width = model.text_encoder.config.hidden_size
    text_states = torch.zeros(len(ids), len(caption_indices), model.max_length, width, dtype=dtype)
    for begin in range(0, len(slots), batch_size):
        part = slots[begin : begin + batch_size]
        states = model.encode_text([caption for _, _, caption in part]).to("cpu", dtype)
        rows = torch.tensor([row for row, _, _ in part])
        cols = torch.tensor([k for _, k, _ in part])
        text_states[rows, cols] = states
    return {"inputs": inputs, "text_states": text_states}


def _captions(dataset: CaptionedImageDataset, i: int, caption_indices: list[int]) -> list[str]:
    """The example's captions at `caption_indices`; those it lacks are left out (their slots stay zero)."""
    captions = dataset.source.captions(i)
    return [captions[c] for c in caption_indices if c < len(captions)]


def input_cache_identity(
    model: TextToImageModel,
    data: str,
    flips: Sequence[bool],
    caption_indices: Sequence[int],
    dtype: torch.dtype,
) -> dict[str, Any]:
    """What decides the cached inputs: the VAE and text encoder weights (not the UNet's: unlearning
    leaves the inputs unchanged), the tokenizer's length, the data, the settings and the dtype."""
    return {
        "encoders": module_fingerprint(
            model.text_encoder, model.vae, extra={"max_length": model.max_length, "shape": model.latent_shape}
        ),
        "data": data,
        "flips": [bool(f) for f in flips],
        "caption_indices": [int(c) for c in caption_indices],
        "dtype": str(dtype),
    }


def input_cache_bytes(
    model: TextToImageModel, num_ids: int, flips: int, captions: int, dtype: torch.dtype = torch.float32
) -> int:
    """The cache's size in bytes for `num_ids` examples."""
    per_id = flips * int(np.prod(model.latent_shape)) + captions * model.max_length * int(
        model.text_encoder.config.hidden_size
    )
    return num_ids * per_id * torch.empty((), dtype=dtype).element_size()


def cached_inputs(
    model: TextToImageModel,
    dataset: CaptionedImageDataset,
    ids: Sequence[int] | np.ndarray,
    flips: Sequence[bool],
    caption_indices: Sequence[int],
    cache_root: str | Path,
    data: str,
    batch_size: int = 64,
    shard_size: int = 256,
    trainer_kwargs: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> SweepInputs:
    """The sweep inputs of `ids` (`encode_inputs`), computed once in resumable shards under
    cache_root/<key of input_cache_identity and the ids> and read from there afterwards."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    identity = input_cache_identity(model, data, flips, caption_indices, dtype)
    out_dir = Path(cache_root) / hash_json([identity, ids.tolist()])
    size = input_cache_bytes(model, len(ids), len(flips), len(caption_indices), dtype)
    log.info(
        "Sweep input cache (VAE and text encoder outputs): %.1f MB for %d examples in %s",
        size / 1e6,
        len(ids),
        out_dir,
    )

    def shard_fn(shard_ids: np.ndarray) -> dict[str, torch.Tensor]:
        return encode_inputs(model, dataset, shard_ids.tolist(), flips, caption_indices, batch_size, dtype)

    shards = run_sharded(
        model, shard_fn, ids, out_dir, identity, shard_size, trainer_kwargs, "sweep input cache"
    )
    return SweepInputs(
        ids=torch.from_numpy(ids),
        flips=tuple(bool(f) for f in flips),
        caption_indices=tuple(int(c) for c in caption_indices),
        inputs=torch.cat([s["inputs"] for s in shards]),
        text_states=torch.cat([s["text_states"] for s in shards]),
        path=out_dir,
    )
