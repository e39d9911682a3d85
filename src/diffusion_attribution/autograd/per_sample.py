"""TODO docstring (diffusion_attribution.curvature.diagonal)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import nn
from torch.func import functional_call, grad, vmap

from diffusion_attribution.objective.loss import per_example_loss


@contextmanager
def vmap_friendly_attention(unet: nn.Module) -> Iterator[nn.Module]:
    """Swap diffusers' SDPA attention processors for the mathematically equivalent explicit ones.

    functorch has no CPU batching rule for the fused scaled-dot-product kernel, so vmap runs it one
    example at a time; the explicit softmax(QK^T)V batches. Only plain `AttnProcessor2_0` layers are
    swapped (custom processors, e.g. Custom Diffusion's, keep their own behaviour).
    """
    processors = getattr(unet, "attn_processors", None)
    if not processors or not hasattr(unet, "set_attn_processor"):
        yield unet
        return
    swapped = {
        name: (AttnProcessor() if type(proc) is AttnProcessor2_0 else proc)
        for name, proc in processors.items()
    }
    if all(swapped[name] is proc for name, proc in processors.items()):
        yield unet
        return
    unet.set_attn_processor(swapped)
    try:
        yield unet
    finally:
        unet.set_attn_processor(processors)


def split_parameters(
    unet: nn.Module, params: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(differentiated, constant): detached copies-by-reference of the selected and of all other
    weights, for `functional_call`. Names must be parameter names of `unet`."""
    own = dict(unet.named_parameters())
    unknown = sorted(set(params) - set(own))
    if unknown:
        raise ValueError(
            f"{len(unknown)} selected parameters are not parameters of the UNet (e.g. {unknown[:3]}). "
            "Select them with select_parameters(model.unet, subset): names are relative to the UNet."
        )
    theta = {name: params[name].detach() for name in params}
    frozen = {name: p.detach() for name, p in own.items() if name not in params}
    return theta, frozen


def functional_per_sample_gradients(
    unet: nn.Module,
    params: Mapping[str, torch.Tensor],
    example_value: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    text_states: torch.Tensor,
    target: torch.Tensor,
    method: str = "vmap",
    vmap_chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Exact gradients [B, *shape] w.r.t. `params` of each example's `example_value(prediction [1, ...],
    target [1, ...]) -> [1]`, the UNet called through `functional_call` with the other weights as
    constants (otherwise autograd would build per-sample gradients of every convolution too).

    method="vmap": one vectorised call; "loop": the same function one example at a time.
    """
    if method not in ("vmap", "loop"):
        raise ValueError(f"Unknown per-sample gradient method {method!r}: use 'vmap' or 'loop'.")
    theta, frozen = split_parameters(unet, params)

    def value(
        theta: dict[str, torch.Tensor],
        noisy: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        target: torch.Tensor,
    ) -> torch.Tensor:
        prediction = functional_call(
            unet, {**frozen, **theta}, (noisy[None], timestep[None]), {"encoder_hidden_states": text[None]}
        ).sample
        return example_value(prediction, target[None])[0]

    with torch.no_grad():  # grad() ignores it inside; it stops autograd tracking outside
        if method == "vmap":
            fn = vmap(grad(value), in_dims=(None, 0, 0, 0, 0), chunk_size=vmap_chunk_size)
            return fn(theta, noisy, timesteps, text_states, target)
        rows = [
            grad(value)(theta, noisy[i], timesteps[i], text_states[i], target[i])
            for i in range(noisy.shape[0])
        ]
    return {name: torch.stack([row[name] for row in rows]) for name in theta}


def per_sample_gradients(
    unet: nn.Module,
    params: Mapping[str, torch.Tensor],
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    text_states: torch.Tensor,
    target: torch.Tensor,
    method: str = "vmap",
    vmap_chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Exact gradients [B, *shape] of each example's diffusion loss w.r.t. `params` (the Fisher's)."""
    args = (noisy, timesteps, text_states, target, method, vmap_chunk_size)
    return functional_per_sample_gradients(unet, params, per_example_loss, *args)
