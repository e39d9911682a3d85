"""Exact per-sample gradients of a diffusion model's output function w.r.t. a weight subset, averaged
over timesteps, captions and flips: the features of TRAK-style attribution.

Output functions f(θ; x_t, c, t), each a per-example mean over channels and pixels:
- "loss": the training loss ‖model(x_t, c, t) − target‖² (TRAK; target = ε or v as the model predicts),
- "output_norm": ‖model(x_t, c, t)‖², the squared norm of the model output (D-TRAK; ε_θ for an
  epsilon model, the predicted v for a v-prediction model).

Per-sample gradients are exact: Linear-only subsets (the default cross-attention K/V) take one batched
forward + backward with hooks (`linear_per_sample_grads`); other subsets `torch.func.vmap(grad(f))`,
falling back to the same function one example at a time where vmap fails.

Training examples are differentiated at fixed timesteps with noise keyed by (seed, Stream.TRAK, id,
caption index, timestep, flip), so a gradient does not depend on batch size, order or sharding (up to
the last bits of float32 convolutions, which round differently in different batch shapes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from diffusion_attribution.autograd.linear_grads import linear_owners, linear_per_sample_grads
from diffusion_attribution.autograd.per_sample import (
    functional_per_sample_gradients,
    vmap_friendly_attention,
)
from diffusion_attribution.data.base import CaptionedImageDataset
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.objective.loss import encode_captions, noisy_inputs
from diffusion_attribution.objective.outputs import check_output, output_values
from diffusion_attribution.utils.seeding import Stream, keyed_randn

GRADIENT_METHODS = ("auto", "linear", "vmap", "loop")


def resolve_method(unet: nn.Module, params: Mapping[str, torch.Tensor], method: str) -> str:
    if method not in GRADIENT_METHODS:
        raise ValueError(f"Unknown per-sample gradient method {method!r}; options: {GRADIENT_METHODS}.")
    linear = linear_owners(unet, params) is not None
    if method == "linear" and not linear:
        raise ValueError("method='linear' needs a subset of nn.Linear weights only (e.g. kv); use 'vmap'.")
    if method == "auto":
        return "linear" if linear else "vmap"
    return method


def per_sample_output_gradients(
    unet: nn.Module,
    params: Mapping[str, torch.Tensor],
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    text_states: torch.Tensor,
    output: str,
    target: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    method: str = "auto",
) -> dict[str, torch.Tensor]:
    """Exact gradients {name: [B, *shape]} (float64) of each example's output function w.r.t. `params`
    (parameters of `unet`, by their names in it). Put the UNet in eval mode first (no dropout)."""
    check_output(output)
    method = resolve_method(unet, params, method)
    if target is None:
        target = torch.zeros_like(noisy)  # unused by output_norm; keeps one signature for vmap
    if method == "linear":

        def batch_values() -> torch.Tensor:
            prediction = unet(noisy, timesteps, encoder_hidden_states=text_states).sample
            return output_values(prediction, output, target, mask)

        return linear_per_sample_grads(unet, params, batch_values, dtype=torch.float64)

    def example_value(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output_values(prediction, output, target, mask)

    args = (unet, params, example_value, noisy, timesteps, text_states, target)
    with vmap_friendly_attention(unet):
        if method == "vmap":
            try:
                grads = functional_per_sample_gradients(*args, method="vmap")
                return {name: value.to(torch.float64) for name, value in grads.items()}
            except (RuntimeError, NotImplementedError):
                pass  # a layer without a batching rule: the same function, one example at a time
        grads = functional_per_sample_gradients(*args, method="loop")
    return {name: value.to(torch.float64) for name, value in grads.items()}


def training_gradient_means(
    model: TextToImageModel,
    dataset: CaptionedImageDataset,
    ids: Sequence[int],
    params: Mapping[str, torch.Tensor],
    output: str,
    timesteps: Sequence[int],
    caption_indices: Sequence[int],
    flips: Sequence[bool] = (False,),
    seed: int = 0,
    batch_size: int = 64,
    method: str = "auto",
) -> dict[str, torch.Tensor]:
    """Each example's gradient of `output` averaged over timesteps × its captions among
    `caption_indices` × flips: {name: [len(ids), *shape]} float64 on the model's device.

    The noise of (id, caption index c, timestep t, flip f) is keyed_randn(latent shape, seed,
    Stream.TRAK, id, c, t, f). A caption index an example does not have is skipped (the mean is over
    the captions it has). `batch_size` (id, caption, flip, timestep) combinations run per backward.
    Memory: len(ids) × (number of selected weights) float64 for the sums.
    """
    check_output(output)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    ids = [int(i) for i in ids]
    steps = [int(t) for t in timesteps]
    flips = [bool(f) for f in flips]
    slots = [int(c) for c in caption_indices]
    if not steps or not flips or not slots:
        raise ValueError("Give at least one timestep, one caption index and one flip setting.")
    device = model.device
    dtype = model.unet.dtype
    sums = {
        n: torch.zeros((len(ids), *p.shape), dtype=torch.float64, device=device) for n, p in params.items()
    }
    counts = torch.zeros(len(ids), dtype=torch.float64, device=device)
    captions_of = {i: dataset.source.captions(i) for i in dict.fromkeys(ids)}
    # id-major order keeps an image's combinations together: each batch encodes few distinct images.
    combos = [
        (row, caption, flip, step)
        for row, example_id in enumerate(ids)
        for flip in flips
        for caption in slots
        if caption < len(captions_of[example_id])
        for step in steps
    ]
    missing = [i for i in dict.fromkeys(ids) if not any(c < len(captions_of[i]) for c in slots)]
    if missing:
        raise ValueError(
            f"Examples {missing[:5]} have none of the caption indices {slots}: use captions=1 (the first caption) "
            "or a list of indices every example has."
        )
    for begin in range(0, len(combos), batch_size):
        chunk = combos[begin : begin + batch_size]
        images: dict[tuple[int, bool], int] = {}
        for row, _, flip, _ in chunk:
            images.setdefault((row, flip), len(images))
        pixels = torch.stack([dataset.example(ids[row], 0, flip)["pixel_values"] for row, flip in images])
        encoded = model.encode_images(pixels.to(device, dtype))
        latents = encoded[[images[(row, flip)] for row, _, flip, _ in chunk]]
        noise = torch.stack(
            [
                keyed_randn(model.latent_shape, seed, Stream.TRAK, ids[row], caption, step, int(flip))
                for row, caption, flip, step in chunk
            ]
        ).to(device, latents.dtype)
        t = torch.tensor([step for *_, step in chunk], dtype=torch.long, device=device)
        with torch.no_grad():
            noisy, target = noisy_inputs(model, latents, noise, t)
            text_states = encode_captions(model, [captions_of[ids[row]][c] for row, c, _, _ in chunk])
        grads = per_sample_output_gradients(
            model.unet, params, noisy, t, text_states, output, target, method=method
        )
        rows = torch.tensor([row for row, *_ in chunk], dtype=torch.long, device=device)
        for name, value in grads.items():
            sums[name].index_add_(0, rows, value)
        counts.index_add_(0, rows, torch.ones(len(chunk), dtype=torch.float64, device=device))
    return {name: value / counts.view(-1, *([1] * (value.dim() - 1))) for name, value in sums.items()}


def point_gradient_means(
    model: TextToImageModel,
    params: Mapping[str, torch.Tensor],
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    captions: Sequence[str],
    output: str,
    target: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    batch_size: int = 64,
    method: str = "auto",
) -> dict[str, torch.Tensor]:
    """The mean over given points (noisy input, timestep, caption[, target]) of the output function's
    gradient: {name: [*shape]} float64. For a query: its points at several timesteps, or the one
    point of its sampling trajectory (JourneyTRAK)."""
    check_output(output)
    device = model.device
    total = {n: torch.zeros(p.shape, dtype=torch.float64, device=device) for n, p in params.items()}
    for begin in range(0, noisy.shape[0], batch_size):
        part = slice(begin, begin + batch_size)
        with torch.no_grad():
            text_states = encode_captions(model, list(captions[part]))
        grads = per_sample_output_gradients(
            model.unet,
            params,
            noisy[part].to(device),
            timesteps[part].to(device),
            text_states,
            output,
            None if target is None else target[part].to(device),
            mask,
            method,
        )
        for name, value in grads.items():
            total[name] += value.sum(0)
    return {name: value / noisy.shape[0] for name, value in total.items()}
