"""`generate`: each image depends only on its own (prompt, seed), whatever else shares its batch."""

from __future__ import annotations

import pytest
import torch

from diffusion_attribution.models.sampling import generate, initial_noise

PROMPTS = [
    "a red circle on a black background",
    "a striped blue square on a white background",
    "a yellow cross on a gray background",
]
SEEDS = [3, 11, 7]
STEPS = 4
ATOL = 1e-4  # batched and single convolutions may round differently


@pytest.fixture
def model(tiny_model):
    return tiny_model.eval()


def test_deterministic_given_prompt_and_seed(model) -> None:
    first = generate(model, PROMPTS, SEEDS, num_steps=STEPS)
    second = generate(model, PROMPTS, SEEDS, num_steps=STEPS)
    assert torch.equal(first.images, second.images)
    assert first.images.shape == (3, 3, 32, 32)
    assert first.images.min() >= -1 and first.images.max() <= 1


def test_returns_latents_and_initial_noise(model) -> None:
    samples = generate(model, PROMPTS, SEEDS, num_steps=STEPS)
    assert samples.latents.shape == (3, *model.latent_shape)
    assert torch.equal(samples.images, model.decode_latents(samples.latents))  # pixel model: a clamp
    assert torch.equal(samples.initial_noise, initial_noise(model, SEEDS))
    assert torch.equal(initial_noise(model, [11])[0], samples.initial_noise[1])


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_independent_of_batch_composition(model, sampler: str, eta: float) -> None:
    batched = generate(model, PROMPTS, SEEDS, num_steps=STEPS, sampler=sampler, eta=eta)
    alone = generate(model, PROMPTS[1:2], SEEDS[1:2], num_steps=STEPS, sampler=sampler, eta=eta)
    torch.testing.assert_close(alone.images[0], batched.images[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(alone.latents[0], batched.latents[1], atol=ATOL, rtol=0)
    # Reordered and split into chunks of two: each (prompt, seed) still gives the same image.
    order = [2, 0, 1]
    chunked = generate(
        model,
        [PROMPTS[k] for k in order],
        [SEEDS[k] for k in order],
        num_steps=STEPS,
        sampler=sampler,
        eta=eta,
        batch_size=2,
    )
    torch.testing.assert_close(chunked.images, batched.images[order], atol=ATOL, rtol=0)


def test_ddpm_sampler(model) -> None:
    first = generate(model, PROMPTS[:2], SEEDS[:2], num_steps=STEPS, sampler="ddpm")
    second = generate(model, PROMPTS[:2], SEEDS[:2], num_steps=STEPS, sampler="ddpm")
    assert torch.equal(first.images, second.images)
    assert torch.isfinite(first.latents).all()
    ddim = generate(model, PROMPTS[:2], SEEDS[:2], num_steps=STEPS, sampler="ddim")
    assert not torch.allclose(first.images, ddim.images)  # stochastic steps do change the result


def test_seed_and_prompt_both_matter(model) -> None:
    base = generate(model, PROMPTS[:1], [0], num_steps=STEPS).images
    assert not torch.allclose(base, generate(model, PROMPTS[:1], [1], num_steps=STEPS).images)
    assert not torch.allclose(base, generate(model, PROMPTS[1:2], [0], num_steps=STEPS).images)
    unguided = generate(model, PROMPTS[:1], [0], num_steps=STEPS, guidance_scale=1.0).images
    assert not torch.allclose(base, unguided)


def test_keeps_the_training_mode_and_the_global_rng(tiny_model) -> None:
    tiny_model.train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate(tiny_model, PROMPTS[:1], [0], num_steps=2, sampler="ddpm")
    assert tiny_model.training
    assert torch.equal(torch.rand(3), expected)  # sampling draws only from its own generators
    # Mixed modes (a training UNet beside a frozen, eval-mode text encoder) come back as they were.
    tiny_model.text_encoder.eval()
    generate(tiny_model, PROMPTS[:1], [0], num_steps=2)
    assert all(m.training for m in tiny_model.unet.modules())
    assert not any(m.training for m in tiny_model.text_encoder.modules())
    tiny_model.eval()


def test_mismatched_prompts_and_seeds_raise(model) -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        generate(model, PROMPTS[:2], [0], num_steps=STEPS)
    with pytest.raises(ValueError, match="1 prompts but 3 seeds"):
        generate(model, PROMPTS[:1], SEEDS, num_steps=STEPS)
    with pytest.raises(ValueError, match="Unknown sampler 'euler'"):
        generate(model, PROMPTS[:1], [0], num_steps=STEPS, sampler="euler")
