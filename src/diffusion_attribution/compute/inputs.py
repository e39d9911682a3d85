"""The UNet's inputs computed from training images: latents of examples encoded deterministically
(the VAE posterior mean, or a posterior sample keyed by (seed, id)), bit-identical whichever ids they
are encoded with."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffusion_attribution.data.base import (
    CaptionedImageDataset,
)
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.utils.seeding import Stream, keyed_generator


@torch.no_grad()
def encode_exemplar_latents(
    model: TextToImageModel,
    dataset: CaptionedImageDataset,
    ids: Sequence[int],
    sample_seed: int | None = None,
) -> torch.Tensor:
    """The UNet-input latents of examples `ids` [len(ids), C, h, w]: the VAE posterior mean (default)
    or, with `sample_seed`, a posterior sample whose noise is keyed by (seed, id); both scaled by the
    VAE's scaling factor (models/pipeline.py encode_images). Each image is encoded on its own, so an
    example's latent is bit-identical whichever ids it is encoded with. Pixel models return pixels."""
    rows = []
    for i in (int(i) for i in ids):
        pixels = dataset.example(i)["pixel_values"][None].to(model.device)
        if sample_seed is None or model.vae is None:
            rows.append(model.encode_images(pixels).cpu())
            continue
        posterior = model.vae.encode(pixels.to(model.vae.dtype)).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=keyed_generator(sample_seed, Stream.ENCODE, i))
        rows.append(
            ((posterior.mean + posterior.std * noise.to(posterior.mean.device)) * model.latent_scale).cpu()
        )
    return torch.cat(rows)
