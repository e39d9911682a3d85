"""The diffusion objective, defined once: every per-example loss of the project (training, the Fisher and
EK-FAC, the loss sweeps, unlearning, TRAK's output functions, leave-K-out's ΔL) is `diffusion_loss` or
`per_example_loss` of this module.

    x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε                   (`noisy_inputs`: the noisy input and the UNet's target,
    target = ε (epsilon) or v (v-prediction)        as the model's scheduler defines them)
    L = w_t · mean over channels and pixels of (UNet(x_t, c, t) − target)²  [· mask]

The random draws (ε, t) are the caller's: keyed draws (objective/draws.py) for every per-example
quantity, the global stream only in plain training.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_attribution.models.pipeline import TextToImageModel


# --------------------------------------------------------------------------------------- helpers
@contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Every submodule in eval mode (no dropout), then each put back as it was."""
    modes = {sub: sub.training for sub in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for sub, mode in modes.items():
            sub.train(mode)


def noisy_inputs(
    model: TextToImageModel, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target): the UNet's input at `timesteps` for clean inputs x0 and `noise`, and what it is
    trained to output there (the noise, or the velocity for a v-prediction model)."""
    return model.add_noise(x0, noise, timesteps), model.target(x0, noise, timesteps)


def per_example_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example mean squared error [B] over channels and pixels (float32): over the masked pixels
    only, weighted by the mask, when a [1, H, W] mask is given; times per-example `weights` [B] (e.g.
    Min-SNR) when given."""
    error = (prediction.float() - target.float()).pow(2)
    if mask is None:
        loss = error.flatten(1).mean(1)
    else:
        mask_weights = mask.to(error.dtype)
        loss = (error * mask_weights).flatten(1).sum(1) / (mask_weights.sum() * error.shape[1])
    return loss if weights is None else weights * loss


def diffusion_loss(
    model: TextToImageModel,
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    text_states: torch.Tensor,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-example diffusion loss [B] of clean inputs x0 (latents, or pixels for a pixel model)
    under `noise` at `timesteps`, conditioned on `text_states`."""
    noisy, target = noisy_inputs(model, x0, noise, timesteps)
    return per_example_loss(model.predict(noisy, timesteps, text_states), target, mask, weights)


def encode_captions(model: TextToImageModel, captions: Sequence[str]) -> torch.Tensor:
    """Text states [len(captions), L, D], each distinct caption encoded once."""
    distinct = list(dict.fromkeys(captions))
    with torch.no_grad():
        states = model.encode_text(distinct)
    index = torch.tensor([distinct.index(c) for c in captions], device=states.device)
    return states[index]


def min_snr_weights(model: TextToImageModel, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., ICCV 2023), expressed for the model's target: the
    easy high-SNR timesteps stop dominating the gradient, which speeds convergence several-fold."""
    alphas = model.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if model.prediction_type == "v_prediction" else clipped / snr


def prepare_mask(mask: torch.Tensor | None, latent_shape: Sequence[int]) -> torch.Tensor | None:
    """Validate a spatial mask in the UNet's input space; returns float weights [1, H, W]."""
    if mask is None:
        return None
    height, width = int(latent_shape[-2]), int(latent_shape[-1])
    mask = torch.as_tensor(mask)
    if mask.dim() == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() != 2 or tuple(mask.shape) != (height, width):
        raise ValueError(
            f"The mask has shape {tuple(mask.shape)}; it must be [{height}, {width}] or [1, {height}, "
            f"{width}], the UNet's input resolution. Resize a pixel-space mask with "
            "mask_to_latent(mask, size) first."
        )
    mask = mask.float()
    if not bool(torch.isfinite(mask).all()) or bool((mask < 0).any()):
        raise ValueError("The mask must hold finite, non-negative weights (1 inside the region, 0 outside).")
    if not bool(mask.any()):
        raise ValueError(
            "The mask is empty (all zero): the region selects no pixel. Give a mask with ones over the "
            "region to unlearn, or no mask to unlearn the whole image."
        )
    return mask[None]


def mask_to_latent(mask: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """A pixel-space mask [H, W] scaled to the UNet's resolution: each cell gets the fraction of
    its pixels inside the region (area averaging), so a box keeps its extent."""
    mask = torch.as_tensor(mask).float()
    if mask.dim() == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() != 2:
        raise ValueError(f"mask_to_latent takes a 2-D mask [H, W]; got shape {tuple(mask.shape)}.")
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(mask[None, None], size=size, mode="area")[0, 0]
