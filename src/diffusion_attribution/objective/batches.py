"""TODO docstring (diffusion_attribution.curvature.diagonal)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from diffusion_attribution.data.base import CaptionedImageDataset
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.objective.draws import fisher_draw
from diffusion_attribution.objective.loss import encode_captions, noisy_inputs


def training_loss_batches(
    model: TextToImageModel,
    dataset: CaptionedImageDataset,
    work: Sequence[tuple[int, int]],
    batch_size: int,
    seed: int,
    random_flip: bool,
) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(chunk, noisy, timesteps, text states, target) batches of the training loss for (example id,
    sample index) pairs, each drawn by `fisher_draw`: what the Fisher and its EK-FAC factors average."""
    device = model.device
    dtype = model.unet.dtype
    num_timesteps = int(model.scheduler.config.num_train_timesteps)
    for begin in range(0, len(work), batch_size):
        chunk = list(work[begin : begin + batch_size])
        pixels, captions, timesteps, noise = [], [], [], []
        for example_id, sample_index in chunk:
            num_captions = len(dataset.source.captions(example_id))
            draw = fisher_draw(
                seed, example_id, sample_index, num_captions, num_timesteps, model.latent_shape, random_flip
            )
            example = dataset.example(example_id, draw.caption_index, draw.flip)
            pixels.append(example["pixel_values"])
            captions.append(example["caption"])
            timesteps.append(draw.timestep)
            noise.append(draw.noise)
        latents = model.encode_images(torch.stack(pixels).to(device, dtype))
        noise_t = torch.stack(noise).to(device, latents.dtype)
        t = torch.tensor(timesteps, dtype=torch.long, device=device)
        with torch.no_grad():
            noisy, target = noisy_inputs(model, latents, noise_t, t)
            text_states = encode_captions(model, captions)
        yield chunk, noisy, t, text_states, target
