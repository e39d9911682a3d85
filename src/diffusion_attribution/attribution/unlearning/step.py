"""Unlearning a query image ẑ = (latents, caption) from the selected UNet weights.

The objective is -L(ẑ, θ) + (N/2)(θ - θ₀)ᵀ F (θ - θ₀); a Newton step on it is
θ ← θ + α (N F)⁻¹ ∇θ L(ẑ, θ): gradient ascent on the query's noise-prediction loss, each weight's
step divided by how much the training set's loss depends on it. The weights are changed in place;
`preserved_parameters` puts θ₀ back so many queries can be unlearned from the same model.

The preconditioner P (θ ← θ + α P⁻¹ ∇θ L(ẑ)) is a `Curvature` (curvature/): the diagonal Fisher
(the paper), its undamped Newton form, EK-FAC (AbU+) or the identity (plain gradient ascent).

The query loss is estimated from `num_samples` (timestep, noise) pairs keyed by (seed, step, sample
index), the timesteps stratified over [0, T) (see `query_draws`). Each step draws fresh pairs; the
recorded loss before/after uses the step-0 pairs, so the two numbers are comparable. Samples cycle
through the captions given.

Step size by target (`target_loss_rise=r`): instead of a fixed α, each step searches along its
preconditioned direction for the α at which the query loss (on the step-0 pairs) has risen by the
fraction r·(s+1)/k of its value before unlearning after step s of k; with one step, loss_after ≈
(1 + r)·loss_before. How far one α moves the query loss differs from model to model by an order of
magnitude (a customized model's object against its style), while the loss rise at which unlearning
ranks best does not, so a target carries over where an α does not. The search costs a few query-loss
evaluations (`num_samples` forwards each), small next to the scoring sweep; `step_size` is its
starting point and the α found is recorded per step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
from torch.func import functional_call, grad_and_value

from diffusion_attribution.autograd.per_sample import split_parameters
from diffusion_attribution.curvature.base import Curvature
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.models.weight_subsets import select_parameters
from diffusion_attribution.objective.draws import query_draws
from diffusion_attribution.objective.loss import (
    encode_captions,
    evaluation_mode,
    noisy_inputs,
    per_example_loss,
    prepare_mask,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- inputs
def prepare_query(model: TextToImageModel, latents: torch.Tensor) -> torch.Tensor:
    """The query in the UNet's input space as [C, H, W] (a [1, C, H, W] batch of one is accepted).
    Latent models: encode pixels first with `model.encode_images`."""
    if latents.dim() == 4 and latents.shape[0] == 1:
        latents = latents[0]
    if tuple(latents.shape) != tuple(model.latent_shape):
        raise ValueError(
            f"The query has shape {tuple(latents.shape)} but the UNet takes {tuple(model.latent_shape)}. "
            "Give one image in the UNet's input space: pixels in [-1, 1] at the model's resolution for "
            "a pixel model, model.encode_images(pixels) for a latent model."
        )
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("The query contains NaN/inf values; pass a finite image.")
    return latents


def _captions(captions: str | Sequence[str]) -> list[str]:
    listed = [captions] if isinstance(captions, str) else list(captions)
    if not listed:
        raise ValueError("The query needs at least one caption.")
    return listed


# ------------------------------------------------------------------------------------- query loss
def _query_chunks(
    model: TextToImageModel,
    latents: torch.Tensor,
    captions: list[str],
    num_samples: int,
    seed: int,
    step: int,
    chunk_size: int,
    stratified: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(noisy, timesteps, text_states, target) chunks covering the step's samples."""
    if num_samples < 1 or chunk_size < 1:
        raise ValueError("num_samples and chunk_size must be at least 1.")
    device = model.device
    num_timesteps = int(model.scheduler.config.num_train_timesteps)
    timesteps, noise = query_draws(seed, step, num_samples, model.latent_shape, num_timesteps, stratified)
    states = encode_captions(model, captions)
    for begin in range(0, num_samples, chunk_size):
        t = timesteps[begin : begin + chunk_size].to(device)
        eps = noise[begin : begin + chunk_size].to(device, latents.dtype)
        x0 = latents[None].expand(len(t), *latents.shape)
        text = states[torch.arange(begin, begin + len(t)) % len(captions)]
        with torch.no_grad():
            noisy, target = noisy_inputs(model, x0, eps, t)
            yield noisy, t, text, target


def query_loss(
    model: TextToImageModel,
    latents: torch.Tensor,
    captions: str | Sequence[str],
    num_samples: int = 64,
    seed: int = 0,
    mask: torch.Tensor | None = None,
    step: int = 0,
    chunk_size: int = 64,
    stratified: bool = True,
) -> float:
    """Mean noise-prediction loss of the query over its keyed (timestep, noise) samples."""
    latents = prepare_query(model, latents).to(model.device, model.unet.dtype)
    weights = prepare_mask(mask, model.latent_shape)
    weights = None if weights is None else weights.to(model.device)
    total = 0.0
    with evaluation_mode(model), torch.no_grad():
        for noisy, t, text, target in _query_chunks(
            model, latents, _captions(captions), num_samples, seed, step, chunk_size, stratified
        ):
            total += float(per_example_loss(model.predict(noisy, t, text), target, weights).double().sum())
    return total / num_samples


def query_loss_gradient(
    model: TextToImageModel,
    latents: torch.Tensor,
    captions: str | Sequence[str],
    params: Mapping[str, torch.Tensor],
    num_samples: int = 64,
    seed: int = 0,
    mask: torch.Tensor | None = None,
    step: int = 0,
    chunk_size: int = 64,
    return_loss: bool = False,
    stratified: bool = True,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], float]:
    """∇θ of the mean query loss over `num_samples` keyed (timestep, noise) pairs, w.r.t. `params`
    (names in model.unet), accumulated over chunks of `chunk_size` so memory stays bounded. With a
    mask [H, W] or [1, H, W] the loss of each sample is the mean over the masked elements."""
    latents = prepare_query(model, latents).to(model.device, model.unet.dtype)
    weights = prepare_mask(mask, model.latent_shape)
    weights = None if weights is None else weights.to(model.device)
    theta, frozen = split_parameters(model.unet, params)

    def chunk_loss(theta: dict[str, torch.Tensor], noisy, t, text, target) -> torch.Tensor:
        out = functional_call(model.unet, {**frozen, **theta}, (noisy, t), {"encoder_hidden_states": text})
        return per_example_loss(out.sample, target, weights).sum() / num_samples

    gradient = {name: torch.zeros_like(value, dtype=torch.float32) for name, value in theta.items()}
    loss = 0.0
    with evaluation_mode(model), torch.no_grad():  # grad_and_value differentiates regardless
        for noisy, t, text, target in _query_chunks(
            model, latents, _captions(captions), num_samples, seed, step, chunk_size, stratified
        ):
            chunk_grad, value = grad_and_value(chunk_loss)(theta, noisy, t, text, target)
            for name, g in chunk_grad.items():
                gradient[name] += g.float()
            loss += float(value)
    return (gradient, loss) if return_loss else gradient


# ------------------------------------------------------------------------------------- update
@dataclass
class UnlearningRecord:
    curvature: str
    steps: int
    step_size: float
    num_samples: int
    num_train: float | None
    damping: float
    loss_before: float
    loss_after: float | None
    step_losses: list[float] = field(default_factory=list)
    relative_change: float = 0.0  # ||θ - θ₀|| / ||θ₀|| over the selected weights
    target_loss_rise: float | None = None
    step_sizes: list[float] = field(default_factory=list)  # the α taken at each step

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


LINE_SEARCH_FACTOR = 3.0  # bracketing: α is multiplied or divided by this until the target is crossed


LINE_SEARCH_BRACKET_TRIES = 12


def _step_size_for_target(
    loss_at: Callable[[float], float],
    target: float,
    initial: float,
    tolerance: float,
    max_bisections: int,
) -> tuple[float, float]:
    """(α, loss) with loss_at(α) within `tolerance` (absolute) of `target`, or the closest found.

    loss_at(0) is below the target. Bracket first (α × or ÷ LINE_SEARCH_FACTOR from `initial`), then
    bisect in log α: the loss rises roughly as a power of α over the range that matters, so geometric
    bisection needs few evaluations. A loss that stops rising before the target (or turns non-finite,
    counted as overshooting) leaves the closest α found; the caller warns.
    """
    tried: dict[float, float] = {}

    def evaluate(alpha: float) -> float:
        if alpha not in tried:
            value = loss_at(alpha)
            tried[alpha] = value if math.isfinite(value) else math.inf
        return tried[alpha]

    def close(value: float) -> bool:
        return abs(value - target) <= tolerance

    alpha = initial
    low, high = 0.0, math.inf  # α below / above the target
    for _ in range(LINE_SEARCH_BRACKET_TRIES):
        value = evaluate(alpha)
        if close(value):
            return alpha, value
        if value < target:
            low = alpha
            if high < math.inf:
                break
            alpha *= LINE_SEARCH_FACTOR
        else:
            high = alpha
            if low > 0:
                break
            alpha /= LINE_SEARCH_FACTOR
    if low > 0 and high < math.inf:
        for _ in range(max_bisections):
            alpha = math.sqrt(low * high)
            value = evaluate(alpha)
            if close(value):
                return alpha, value
            low, high = (alpha, high) if value < target else (low, alpha)
    best = min(tried, key=lambda a: abs(tried[a] - target))
    return best, tried[best]


def unlearn(
    model: TextToImageModel,
    latents: torch.Tensor,
    captions: str | Sequence[str],
    curvature: Curvature,
    params: str | Mapping[str, torch.Tensor] = "kv",
    steps: int = 1,
    step_size: float = 0.01,
    num_samples: int = 64,
    num_train: float | None = None,
    seed: int = 0,
    mask: torch.Tensor | None = None,
    chunk_size: int = 64,
    track_loss: bool = True,
    stratified: bool = True,
    target_loss_rise: float | None = None,
    line_search_tolerance: float = 0.05,  # relative to the rise: r = 1 accepts 0.95–1.05
    line_search_bisections: int = 10,
) -> UnlearningRecord:
    """`steps` updates θ ← θ + α P⁻¹ ∇θ L(ẑ) on the selected weights, in place (see the module
    docstring). `curvature` is fitted (or loaded) for these weights; `num_train` is N (default: the
    number of examples the curvature was fitted on).
    With `target_loss_rise` r, α is searched per step so that the query loss ends r·100% above its
    value before (module docstring); `step_size` is the search's starting α.
    Wrap in `preserved_parameters(params)` to get θ₀ back afterwards."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}.")
    if target_loss_rise is not None and not target_loss_rise > 0:
        raise ValueError(
            f"target_loss_rise must be a positive fraction (1.0 = the query loss doubles), got "
            f"{target_loss_rise}; use null for a fixed step size."
        )
    if not isinstance(curvature, Curvature):
        raise TypeError(
            f"unlearn needs a Curvature (curvature/: diagonal, ekfac, identity), not {type(curvature).__name__}."
        )
    selected = select_parameters(model.unet, params) if isinstance(params, str) else dict(params)
    curvature.validate(selected)
    if num_train is None:
        num_train = curvature.default_num_train()
    if curvature.needs_fit and not (num_train is not None and num_train > 0):
        raise ValueError(
            "Give num_train (N, the training set size, e.g. 118287 for COCO): the curvature does not record it."
        )
    latents = prepare_query(model, latents)
    prepare_mask(mask, model.latent_shape)
    original = {name: p.detach().clone() for name, p in selected.items()}
    step_losses: list[float] = []
    step_sizes: list[float] = []
    searched_loss: float | None = None

    def reference_loss() -> float:  # the step-0 pairs, as loss_before and loss_after
        return query_loss(model, latents, captions, num_samples, seed, mask, 0, chunk_size, stratified)

    def loss_along(start: dict[str, torch.Tensor], direction: dict[str, torch.Tensor], alpha: float) -> float:
        """The reference loss at θ = start + α · direction (the weights are left there)."""
        with torch.no_grad():
            for name, param in selected.items():
                param.copy_(start[name]).add_(direction[name], alpha=alpha)
        return reference_loss()

    for step in range(steps):
        gradient, loss = query_loss_gradient(
            model,
            latents,
            captions,
            selected,
            num_samples,
            seed,
            mask,
            step,
            chunk_size,
            return_loss=True,
            stratified=stratified,
        )
        step_losses.append(loss)
        gradient = curvature.precondition(gradient, float(num_train or 0.0))
        with torch.no_grad():
            direction = {name: gradient[name].to(param.dtype) for name, param in selected.items()}
        if target_loss_rise is None:
            alpha = step_size
        else:
            start = {name: p.detach().clone() for name, p in selected.items()}
            loss_at = partial(loss_along, start, direction)
            rise = step_losses[0] * target_loss_rise * (step + 1) / steps
            target, tolerance = step_losses[0] + rise, line_search_tolerance * rise
            initial = step_sizes[-1] if step_sizes else step_size
            alpha, searched_loss = _step_size_for_target(
                loss_at, target, initial, tolerance, line_search_bisections
            )
            if abs(searched_loss - target) > tolerance:
                log.warning(
                    "Step %d: no step size brings the query loss to %.4g (target_loss_rise %g); the closest "
                    "found, α = %.3g, gives %.4g. The query loss may not rise that far along this direction: "
                    "lower method.target_loss_rise.",
                    step,
                    target,
                    target_loss_rise,
                    alpha,
                    searched_loss,
                )
            with torch.no_grad():
                for name, param in selected.items():
                    param.copy_(start[name])
        step_sizes.append(alpha)
        with torch.no_grad():
            for name, param in selected.items():
                param.add_(direction[name], alpha=alpha)
    if not track_loss:
        loss_after = None
    elif searched_loss is not None:  # the search evaluated exactly this: the step-0 pairs at the final θ
        loss_after = searched_loss
    else:
        loss_after = reference_loss()
    with torch.no_grad():
        moved = sum(float((p.double() - original[n].double()).pow(2).sum()) for n, p in selected.items())
        norm = sum(float(original[n].double().pow(2).sum()) for n in selected)
    return UnlearningRecord(
        curvature=curvature.name,
        steps=steps,
        step_size=step_size,
        num_samples=num_samples,
        num_train=num_train,
        damping=curvature.damping,
        loss_before=step_losses[0],
        loss_after=loss_after,
        step_losses=step_losses,
        relative_change=(moved / norm) ** 0.5 if norm > 0 else float("inf"),
        target_loss_rise=target_loss_rise,
        step_sizes=step_sizes,
    )


class ParameterSnapshot:
    """Copies of parameters taken now, written back by `restore()`."""

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        self.params = dict(params)
        self.saved = {name: p.detach().clone() for name, p in self.params.items()}

    def restore(self) -> None:
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.saved[name])


@contextmanager
def preserved_parameters(params: Mapping[str, torch.Tensor]) -> Iterator[ParameterSnapshot]:
    """Snapshot the parameters, run the block (e.g. unlearn + score), then restore θ₀ even on error."""
    snapshot = ParameterSnapshot(params)
    try:
        yield snapshot
    finally:
        snapshot.restore()
