"""What leave-K-out measures on a model: ΔL, the query's loss on a fixed-noise timestep grid, and ΔG,
the change of the image it generates (pixel MSE, CLIP similarity, the concept the attribute reader
sees), each against the base model θ₀'s reference."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.evaluation.leave_k_out.runs import LeaveKOutError
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.models.sampling import generate
from diffusion_attribution.objective.loss import diffusion_loss, encode_captions, evaluation_mode
from diffusion_attribution.utils.seeding import Stream, keyed_randn


def loss_timesteps(model: TextToImageModel, stride: int = 5) -> list[int]:
    """The fine grid of ΔL: every `stride`-th training timestep (the paper: stride 5 of 1000)."""
    if stride < 1:
        raise LeaveKOutError(f"benchmark.retrain.timestep_stride must be at least 1, got {stride}.")
    return list(range(0, int(model.scheduler.config.num_train_timesteps), stride))


@torch.no_grad()
def fixed_noise_loss(
    model: TextToImageModel,
    latent: torch.Tensor,
    caption: str,
    key: int,
    timesteps: Sequence[int],
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """L(ẑ, θ): the noise-prediction loss of one latent, averaged over pixels and `timesteps`, with the
    noise of timestep t keyed by (seed, key, t). Same batches for every model: the same model gives
    exactly the same number."""
    device = model.device
    total = 0.0
    with evaluation_mode(model):
        text = encode_captions(model, [caption])
        for start in range(0, len(timesteps), batch_size):
            steps = list(timesteps[start : start + batch_size])
            noise = torch.stack(
                [keyed_randn(model.latent_shape, seed, Stream.QUERY_NOISE, key, t) for t in steps]
            )
            noise = noise.to(device, model.unet.dtype)
            latents = latent[None].to(device, model.unet.dtype).expand(len(steps), *latent.shape)
            t = torch.tensor(steps, dtype=torch.long, device=device)
            states = text.expand(len(steps), *text.shape[1:])
            total += float(diffusion_loss(model, latents, noise, t, states).double().sum())
    return total / len(timesteps)


def generate_one(model: TextToImageModel, prompt: str, seed: int, sampler: dict[str, Any]) -> torch.Tensor:
    """One image [3, H, W] in [-1, 1] (one at a time: identical batching for every model)."""
    return generate(model, [prompt], [seed], **sampler).images[0].cpu()


def pixel_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared pixel difference of two images in [-1, 1], measured on the [0, 1] scale."""
    return float(((a.double() - b.double()) / 2).pow(2).mean())


class ImageJudges:
    """Optional readers of generated images: CLIP image features (cosine similarity) and, on the
    embedded world, the attribute reader's concept."""

    def __init__(
        self, clip_path: str | None, datamodule: CaptionedImageDataModule, reader_cache_dir: str
    ) -> None:
        self.clip = None
        if clip_path:
            from diffusion_attribution.models.backbones import load_backbone

            self.clip = load_backbone("clip", clip_path)
        self.reader = None
        from diffusion_attribution.data.shapes import ShapesDataModule

        if isinstance(datamodule, ShapesDataModule):
            from diffusion_attribution.evaluation.attribute_reader import load_or_train_reader

            self.reader, _ = load_or_train_reader(datamodule.world, reader_cache_dir)

    def clip_similarity(self, a: torch.Tensor, b: torch.Tensor) -> float:
        if self.clip is None:
            return math.nan
        features = self.clip.image_features(torch.stack([a, b]).to(self.clip.device))
        return float(torch.nn.functional.cosine_similarity(features[0], features[1], dim=0))

    def concept(self, image: torch.Tensor) -> str | None:
        if self.reader is None:
            return None
        return self.reader.read(image[None])[0]["concept"]


@dataclass
class Reference:
    """What θ₀ gives for a query or retention prompt (computed once)."""

    loss: float
    image: torch.Tensor | None
    concept: str | None = None


@dataclass
class RetentionPrompt:
    prompt: str
    seed: int
    latent: torch.Tensor
    key: int


def model_metrics(
    model: TextToImageModel,
    latent: torch.Tensor,
    caption: str,
    key: int,
    prompt: str | None,
    seed: int | None,
    sampler: dict[str, Any],
    reference: Reference,
    judges: ImageJudges,
    timesteps: Sequence[int],
    loss_seed: int,
    batch_size: int,
) -> tuple[dict[str, float], torch.Tensor | None]:
    """ΔL, ΔG MSE, ΔG CLIP and the concept read in the new image, against θ₀'s `reference`."""
    loss = fixed_noise_loss(model, latent, caption, key, timesteps, loss_seed, batch_size)
    out: dict[str, Any] = {"loss_retrained": loss, "delta_loss": loss - reference.loss}
    image = None
    if prompt is not None and seed is not None and reference.image is not None:
        image = generate_one(model, prompt, seed, sampler)
        out["dg_mse"] = pixel_mse(image, reference.image)
        out["dg_clip"] = judges.clip_similarity(image, reference.image)
        out["concept_read"] = judges.concept(image)
    else:
        out.update(dg_mse=math.nan, dg_clip=math.nan, concept_read=None)
    return out, image
