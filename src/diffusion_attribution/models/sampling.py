"""Sampling with classifier-free guidance. Each image depends only on its own (prompt, seed): the
initial noise and any stochastic step noise come from a generator seeded per image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffusion_attribution.models.pipeline import TextToImageModel


@dataclass
class Samples:
    images: torch.Tensor  # [B, 3, H, W] in [-1, 1]
    latents: torch.Tensor  # final (denoised) latents, the UNet's input space
    initial_noise: torch.Tensor
    # sampler timestep -> the latents x_t the UNet was given at that step ([B, C, H, W]), for the
    # steps asked for with `record_timesteps` (JourneyTRAK takes the query's gradient there).
    trajectory: dict[int, torch.Tensor] = field(default_factory=dict)


def make_sampler(model: TextToImageModel, sampler: str = "ddim") -> DDIMScheduler | DDPMScheduler:
    if sampler == "ddim":
        return DDIMScheduler.from_config(model.scheduler.config)
    if sampler == "ddpm":
        return DDPMScheduler.from_config(model.scheduler.config)
    raise ValueError(f"Unknown sampler {sampler!r}: use ddim or ddpm.")


def sampler_timesteps(model: TextToImageModel, num_steps: int = 30, sampler: str = "ddim") -> list[int]:
    """The timesteps `generate` visits, in order (the noisiest first)."""
    scheduler = make_sampler(model, sampler)
    scheduler.set_timesteps(num_steps)
    return [int(t) for t in scheduler.timesteps]


def initial_noise(model: TextToImageModel, seeds: Sequence[int]) -> torch.Tensor:
    shape = model.latent_shape
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def generate(
    model: TextToImageModel,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_steps: int = 30,
    guidance_scale: float = 3.0,
    sampler: str = "ddim",
    eta: float = 0.0,
    batch_size: int = 64,
    record_timesteps: Sequence[int] = (),
) -> Samples:
    """`record_timesteps`: sampler timesteps (see `sampler_timesteps`) whose input latents x_t are
    kept in `Samples.trajectory`."""
    if len(prompts) != len(seeds):
        raise ValueError(f"Got {len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt.")
    scheduler = make_sampler(model, sampler)
    record = {int(t) for t in record_timesteps}
    if record:
        visited = sampler_timesteps(model, num_steps, sampler)
        missing = sorted(record - set(visited))
        if missing:
            raise ValueError(
                f"Timesteps {missing} are not visited by the {sampler} sampler with {num_steps} steps; it visits "
                f"{visited}. Record one of those (e.g. the nearest)."
            )
    trajectories: dict[int, list[torch.Tensor]] = {t: [] for t in record}
    # Restore every submodule's own mode afterwards (not one flag for all): during training a frozen
    # text encoder or VAE stays in eval mode while the UNet trains.
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    outputs_images, outputs_latents, noises = [], [], []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = list(prompts[start : start + batch_size])
        batch_seeds = [int(s) for s in seeds[start : start + batch_size]]
        noise = initial_noise(model, batch_seeds).to(model.device)
        generators = [torch.Generator().manual_seed(s + 1) for s in batch_seeds]
        text = model.encode_text(batch_prompts)
        uncond = model.encode_text([""] * len(batch_prompts))
        latents = noise * scheduler.init_noise_sigma
        scheduler.set_timesteps(num_steps)
        for t in scheduler.timesteps:
            if int(t) in record:
                trajectories[int(t)].append(latents.clone())
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            timesteps = torch.full((model_in.shape[0],), int(t), device=model.device, dtype=torch.long)
            pred_uncond, pred_text = model.predict(model_in, timesteps, torch.cat([uncond, text])).chunk(2)
            pred = pred_uncond + guidance_scale * (pred_text - pred_uncond)
            # DDIM re-derives its noise estimate from the clipped x0: with clip_sample on, v-prediction
            # and guidance, the unclipped estimate disagrees with the clipped x0 and the deterministic
            # sampler drifts into saturated noise (DDPM's posterior step has no such mismatch).
            kwargs = {"eta": eta, "use_clipped_model_output": True} if sampler == "ddim" else {}
            step_noise_generator = generators if (sampler == "ddpm" or eta > 0) else None
            latents = scheduler.step(pred, t, latents, generator=step_noise_generator, **kwargs).prev_sample
        outputs_latents.append(latents)
        outputs_images.append(model.decode_latents(latents))
        noises.append(noise)
    for module, mode in modes:
        module.training = mode
    return Samples(
        torch.cat(outputs_images),
        torch.cat(outputs_latents),
        torch.cat(noises),
        {t: torch.cat(parts) for t, parts in trajectories.items()},
    )
