"""The keyed random draws (timestep, caption, flip, noise) of the per-example quantities outside the
loss sweep: a Fisher / EK-FAC sample of a training example (`fisher_draw`), the (timestep, noise)
samples of an unlearned query's loss (`query_draws`). Each comes from a generator keyed by what it is for (utils/seeding.py: seed, stream, example or step, sample
index), never by when it is drawn, so the results do not depend on batch size, order or sharding.
(The loss sweep draws its own noise: objective/sweep.py.)"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffusion_attribution.utils.seeding import Stream, keyed_generator

# Separates the Fisher's random stream from every other keyed stream (loss sweep, query samples).


@dataclass(frozen=True)
class FisherDraw:
    """The random choices for one Fisher sample of one example."""

    timestep: int
    caption_index: int
    flip: bool
    noise: torch.Tensor


def fisher_draw(
    seed: int,
    example_id: int,
    sample_index: int,
    num_captions: int,
    num_timesteps: int,
    latent_shape: Sequence[int],
    random_flip: bool,
) -> FisherDraw:
    """Timestep (uniform, as in training), caption, flip coin and noise, all keyed by what they are
    for. The coin is always drawn so the other draws do not depend on whether flips are used."""
    generator = keyed_generator(seed, Stream.FISHER, example_id, sample_index)
    timestep = int(torch.randint(num_timesteps, (), generator=generator))
    caption_index = int(torch.randint(num_captions, (), generator=generator))
    coin = float(torch.rand((), generator=generator))
    noise = torch.randn(tuple(latent_shape), generator=generator)
    return FisherDraw(timestep, caption_index, bool(random_flip and coin < 0.5), noise)


def query_draws(
    seed: int,
    step: int,
    num_samples: int,
    latent_shape: Sequence[int],
    num_timesteps: int,
    stratified: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps [S] and noise [S, *latent_shape] for the query loss at an unlearning step.

    Timesteps are uniform over [0, num_timesteps). Stratified (default): sample j is uniform within
    the j-th of S equal strata, which keeps the estimate of the mean over timesteps unbiased and
    removes most of its variance (the loss varies far more with t than with the noise).
    """
    timesteps, noise = [], []
    for index in range(num_samples):
        generator = keyed_generator(seed, Stream.QUERY, step, index)
        u = float(torch.rand((), generator=generator))
        position = (index + u) / num_samples if stratified else u
        timesteps.append(min(int(position * num_timesteps), num_timesteps - 1))
        noise.append(torch.randn(tuple(latent_shape), generator=generator))
    return torch.tensor(timesteps, dtype=torch.long), torch.stack(noise)


# Separates the noise of these gradients from every other keyed stream (loss sweep, Fisher, queries).
