"""A correction for general sensitivity to unlearning (`method.sensitivity`): some training images
rise after unlearning almost any query ("hubs") and crowd the top of unrelated rankings. Unlearning a
fixed bank of generated images of random training captions measures each image's own tendency to rise,
its mean (and spread) score over the bank; a query's score is then taken relative to it:

    subtract:     s'(z) = s(z) − mean_bank s(z)
    standardize:  s'(z) = (s(z) − mean_bank s(z)) / std_bank s(z)

The bank is computed once per model, data and method settings and cached under cache_dir; it costs
`bank_size` unlearnings and full after-unlearning sweeps per model, nothing per query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffusion_attribution.attribution.queries import Query
from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.models.sampling import generate
from diffusion_attribution.utils.seeding import Stream, keyed_generator

CORRECTIONS = ("subtract", "standardize")


@dataclass(frozen=True)
class SensitivitySettings:
    """`method.sensitivity`: bank_size 0 switches the correction off."""

    bank_size: int = 0
    correction: str = "subtract"
    seed: int = 0
    num_steps: int = 30  # the bank's sampler: DDIM steps and guidance, as attribute.py's queries
    guidance_scale: float = 3.0

    def __post_init__(self) -> None:
        if isinstance(self.bank_size, bool) or int(self.bank_size) != self.bank_size or self.bank_size < 0:
            raise ValueError(
                f"method.sensitivity.bank_size must be an integer >= 0 (0: no correction), got {self.bank_size!r}."
            )
        if self.bank_size == 1 and self.correction == "standardize":
            raise ValueError("method.sensitivity.correction=standardize needs bank_size >= 2 (a spread).")
        if self.correction not in CORRECTIONS:
            raise ValueError(
                f"Unknown method.sensitivity.correction={self.correction!r}; options: {CORRECTIONS}."
            )

    @property
    def enabled(self) -> bool:
        return self.bank_size > 0


def bank_queries(
    model: TextToImageModel, datamodule: CaptionedImageDataModule, settings: SensitivitySettings
) -> list[Query]:
    """`bank_size` images generated from the first caption of training examples drawn with a keyed
    generator (same seed, same bank), each with its own keyed sampling seed."""
    train_ids = np.asarray(datamodule.train_ids)
    generator = keyed_generator(settings.seed, Stream.SENSITIVITY_BANK)
    picks = torch.randperm(len(train_ids), generator=generator)[: settings.bank_size].tolist()
    ids = [int(train_ids[p]) for p in picks]
    prompts = [datamodule.source.captions(i)[0] for i in ids]
    seeds = [int(s) for s in torch.randint(0, 2**31 - 1, (len(ids),), generator=generator)]
    samples = generate(
        model, prompts, seeds, num_steps=settings.num_steps, guidance_scale=settings.guidance_scale
    )
    return [
        Query(
            prompt,
            samples.images[k].cpu(),
            samples.latents[k].cpu(),
            None,
            {"prompt": prompt, "seed": seeds[k], "bank_id": ids[k]},
        )
        for k, prompt in enumerate(prompts)
    ]


def correct(scores: np.ndarray, mean: np.ndarray, std: np.ndarray, correction: str) -> np.ndarray:
    """The query scores [Q, N] relative to the bank's per-image mean (and spread)."""
    shifted = scores - mean[None]
    if correction == "standardize":
        return (shifted / np.maximum(std, np.finfo(np.float32).tiny)[None]).astype(np.float32)
    return shifted.astype(np.float32)


def describe(settings: SensitivitySettings) -> dict[str, Any]:
    return {
        "bank_size": settings.bank_size,
        "correction": settings.correction,
        "seed": settings.seed,
        "num_steps": settings.num_steps,
        "guidance_scale": settings.guidance_scale,
    }
