"""The diagonal empirical Fisher of the training loss over the training set (the EWC penalty of
attribution by unlearning): F = mean over training examples of the squared per-sample gradient of
the noise-prediction loss with respect to the selected UNet weights.

Every example's draw (timestep, noise, caption, flip) comes from a generator keyed by (seed, example
id, sample index), so the Fisher does not depend on batch size, order or sharding. To run on many
processes, give each its shard of ids to `accumulate_fisher`, add the `FisherSums` up with
`all_reduce_fisher_sums` (a no-op without torch.distributed), then `finalize`.

Per-sample gradients are exact: `torch.func.vmap(torch.func.grad(loss))` over the batch, with the
weights that are not differentiated passed in as constants (otherwise autograd would also build the
per-sample weight gradients of every convolution). Where vmap fails on some layer, `method="auto"`
falls back to the same function called one example at a time (same result, slower).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from safetensors import safe_open
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from ..data.base import CaptionedImageDataset
from ..methods.weight_subsets import select_parameters
from ..models.pipeline import TextToImageModel
from ..utils.atomic import atomic_save_tensors, atomic_write_text
from ..utils.seeding import keyed_generator

logger = logging.getLogger(__name__)

# Separates the Fisher's random stream from every other keyed stream (loss sweep, query samples).
FISHER_STREAM = 7_146_081
METADATA_KEY = "diffusion_attribution.fisher"
NAMES_KEY = "diffusion_attribution.fisher.names"  # safetensors sorts tensors; keep the model's order
FISHER_METHODS = ("auto", "vmap", "loop")


class FisherError(ValueError):
    """A Fisher that cannot be used (non-finite, all zero, or made for other weights)."""


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


def squared_error(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-example mean squared error [B] over channels and pixels (over the masked pixels only,
    weighted by the mask, when a [1, H, W] mask is given)."""
    error = (prediction.float() - target.float()).pow(2)
    if mask is None:
        return error.flatten(1).mean(1)
    weights = mask.to(error.dtype)
    return (error * weights).flatten(1).sum(1) / (weights.sum() * error.shape[1])


def encode_captions(model: TextToImageModel, captions: Sequence[str]) -> torch.Tensor:
    """Text states [len(captions), L, D], each distinct caption encoded once."""
    distinct = list(dict.fromkeys(captions))
    with torch.no_grad():
        states = model.encode_text(distinct)
    index = torch.tensor([distinct.index(c) for c in captions], device=states.device)
    return states[index]


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
    """Exact gradients [B, *shape] of each example's mean squared error w.r.t. `params`.

    method="vmap": one vectorised call; "loop": the same function one example at a time.
    """
    if method not in ("vmap", "loop"):
        raise ValueError(f"Unknown per-sample gradient method {method!r}: use 'vmap' or 'loop'.")
    theta, frozen = split_parameters(unet, params)

    def example_loss(
        theta: dict[str, torch.Tensor],
        noisy: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        target: torch.Tensor,
    ) -> torch.Tensor:
        out = functional_call(
            unet, {**frozen, **theta}, (noisy[None], timestep[None]), {"encoder_hidden_states": text[None]}
        ).sample
        return squared_error(out, target[None])[0]

    with torch.no_grad():  # grad() ignores it inside; it stops autograd tracking outside
        if method == "vmap":
            fn = vmap(grad(example_loss), in_dims=(None, 0, 0, 0, 0), chunk_size=vmap_chunk_size)
            return fn(theta, noisy, timesteps, text_states, target)
        rows = [
            grad(example_loss)(theta, noisy[i], timesteps[i], text_states[i], target[i])
            for i in range(noisy.shape[0])
        ]
    return {name: torch.stack([row[name] for row in rows]) for name in theta}


# --------------------------------------------------------------------------------------- Fisher
@dataclass
class FisherDiagonal:
    """Diagonal Fisher: parameter name (in `model.unet`) -> tensor of that parameter's shape."""

    values: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]

    def __contains__(self, name: object) -> bool:
        return name in self.values

    def __len__(self) -> int:
        return len(self.values)

    @property
    def names(self) -> list[str]:
        return list(self.values)

    def numel(self) -> int:
        return sum(v.numel() for v in self.values.values())

    def mean(self, names: Sequence[str] | None = None) -> float:
        """Mean over every entry (of the named tensors only, if given)."""
        chosen = [self.values[n] for n in (self.values if names is None else names)]
        total = sum(float(v.double().sum()) for v in chosen)
        count = sum(v.numel() for v in chosen)
        return total / count if count else math.nan

    def to(self, device: torch.device | str) -> FisherDiagonal:
        return FisherDiagonal({n: v.to(device) for n, v in self.values.items()}, dict(self.metadata))

    def validate(self, params: Mapping[str, torch.Tensor] | None = None) -> FisherDiagonal:
        """Raise FisherError unless every entry is finite and non-negative and not all are zero; with
        `params`, also unless it has every one of them, with the same shapes."""
        made_by = f" (made with {self.metadata})" if self.metadata else ""
        if not self.values:
            raise FisherError("The Fisher is empty. Compute it with compute_fisher for the weight subset.")
        for name, value in self.values.items():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise FisherError(
                    f"The Fisher has {bad} NaN/inf entries in {name}{made_by}. The model or the training "
                    "loss overflowed: check the checkpoint's weights for NaN, compute in float32, then "
                    "recompute the Fisher (delete the cached file)."
                )
            if bool((value < 0).any()):
                raise FisherError(
                    f"The Fisher has negative entries in {name}; a mean of squared gradients cannot be "
                    "negative. The file is corrupt or not a Fisher: recompute it."
                )
        if all(not bool(v.any()) for v in self.values.values()):
            raise FisherError(
                f"Every Fisher entry is zero{made_by}: the training loss does not depend on the selected "
                "weights (e.g. zero text states for a cross-attention subset, or no examples). Choose a "
                "weight subset that affects the loss, or check the model and ids, then recompute."
            )
        if params is not None:
            missing = [n for n in params if n not in self.values]
            if missing:
                raise FisherError(
                    f"The Fisher lacks {len(missing)} of the selected weights (e.g. {missing[:3]}); it was "
                    f"computed for other weights{made_by}. Recompute it with the same weight subset and "
                    "model as the unlearning."
                )
            wrong = [n for n in params if tuple(self.values[n].shape) != tuple(params[n].shape)]
            if wrong:
                raise FisherError(
                    f"Fisher shapes differ from the model's for {wrong[:3]}: it belongs to another model "
                    "architecture. Recompute it for this checkpoint."
                )
        return self

    def save(self, path: str | Path) -> Path:
        """`path` (safetensors, metadata in its header) plus a readable `<stem>.json` beside it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {n: v.to(torch.float32) for n, v in self.values.items()}
        text = json.dumps(self.metadata, sort_keys=True, default=str)
        atomic_save_tensors(path, tensors, {METADATA_KEY: text, NAMES_KEY: json.dumps(list(tensors))})
        atomic_write_text(
            path.with_suffix(".json"), json.dumps(self.metadata, indent=2, sort_keys=True, default=str)
        )
        return path

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> FisherDiagonal:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"No Fisher file at {path}. Compute one with compute_fisher(...).save(path) first."
            )
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            header = handle.metadata() or {}
            names = json.loads(header[NAMES_KEY]) if NAMES_KEY in header else sorted(handle.keys())
            values = {name: handle.get_tensor(name) for name in names}
        metadata = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else {}
        return cls(values, metadata)


@dataclass
class FisherSums:
    """Sum of squared per-sample gradients (float64) and the number of samples they came from."""

    sums: dict[str, torch.Tensor]
    count: int

    def merge(self, other: FisherSums) -> FisherSums:
        if set(other.sums) != set(self.sums):
            raise ValueError("Cannot merge Fisher sums over different weights.")
        sums = {n: self.sums[n] + other.sums[n].to(self.sums[n].device) for n in self.sums}
        return FisherSums(sums, self.count + other.count)

    def finalize(self, metadata: dict[str, Any] | None = None) -> FisherDiagonal:
        if self.count <= 0:
            raise FisherError("No examples went into the Fisher: pass a non-empty list of ids.")
        values = {n: (s / self.count).to(torch.float32) for n, s in self.sums.items()}
        return FisherDiagonal(values, {**(metadata or {}), "num_samples": self.count})


def all_reduce_fisher_sums(sums: FisherSums) -> FisherSums:
    """Sum the per-process `FisherSums` over all processes (in place); a no-op when torch.distributed
    is not initialised. Tensors must be on the device the backend expects (CUDA for NCCL)."""
    if not (dist.is_available() and dist.is_initialized()):
        return sums
    for value in sums.sums.values():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    device = next(iter(sums.sums.values())).device
    count = torch.tensor([sums.count], dtype=torch.float64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    sums.count = int(count.item())
    return sums


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
    generator = keyed_generator(seed, FISHER_STREAM, example_id, sample_index)
    timestep = int(torch.randint(num_timesteps, (), generator=generator))
    caption_index = int(torch.randint(num_captions, (), generator=generator))
    coin = float(torch.rand((), generator=generator))
    noise = torch.randn(tuple(latent_shape), generator=generator)
    return FisherDraw(timestep, caption_index, bool(random_flip and coin < 0.5), noise)


def _resolve_params(model: TextToImageModel, params: str | Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return select_parameters(model.unet, params) if isinstance(params, str) else dict(params)


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
            noisy = model.add_noise(latents, noise_t, t)
            target = model.target(latents, noise_t, t)
            text_states = encode_captions(model, captions)
        yield chunk, noisy, t, text_states, target


def accumulate_fisher(
    model: TextToImageModel,
    dataset: CaptionedImageDataset,
    ids: Sequence[int],
    params: str | Mapping[str, torch.Tensor] = "kv",
    batch_size: int = 64,
    seed: int = 0,
    random_flip: bool | None = None,
    samples_per_example: int = 1,
    method: str = "auto",
    vmap_chunk_size: int | None = None,
    progress: bool = True,
) -> FisherSums:
    """Sum over `ids` (this process's shard) of squared per-sample gradients of the training loss.

    Each (id, sample) gets its timestep, noise, caption and flip from `fisher_draw`; flips follow
    `dataset.random_flip` unless `random_flip` says otherwise. The real caption is used (no caption
    dropout). Memory: batch_size x (number of selected weights) floats for the per-sample gradients.
    """
    if method not in FISHER_METHODS:
        raise ValueError(f"Unknown Fisher method {method!r}; options: {FISHER_METHODS}.")
    if batch_size < 1 or samples_per_example < 1:
        raise ValueError("batch_size and samples_per_example must be at least 1.")
    selected = _resolve_params(model, params)
    flip = dataset.random_flip if random_flip is None else bool(random_flip)
    device = model.device
    sums = {n: torch.zeros(p.shape, dtype=torch.float64, device=device) for n, p in selected.items()}
    work = [(int(i), s) for i in ids for s in range(samples_per_example)]
    started = time.perf_counter()
    bar = tqdm(total=len(work), desc="Fisher", unit="sample", disable=not progress)
    with evaluation_mode(model), vmap_friendly_attention(model.unet):
        for chunk, noisy, t, text_states, target in training_loss_batches(
            model, dataset, work, batch_size, seed, flip
        ):
            args = (model.unet, selected, noisy, t, text_states, target)
            if method == "auto":
                try:
                    grads = per_sample_gradients(*args, method="vmap", vmap_chunk_size=vmap_chunk_size)
                    method = "vmap"
                except (RuntimeError, NotImplementedError) as error:
                    logger.warning("vmap per-sample gradients failed (%s); computing them one by one.", error)
                    method = "loop"
                    grads = per_sample_gradients(*args, method="loop")
            else:
                grads = per_sample_gradients(*args, method=method, vmap_chunk_size=vmap_chunk_size)
            for name, value in grads.items():
                sums[name] += value.double().pow(2).sum(0)
            bar.update(len(chunk))
    bar.close()
    logger.info(
        "Fisher: %d samples of %d weights in %.1f s (%s).",
        len(work),
        sum(p.numel() for p in selected.values()),
        time.perf_counter() - started,
        method,
    )
    return FisherSums(sums, len(work))


def compute_fisher(
    model: TextToImageModel,
    dataset: CaptionedImageDataset,
    ids: Sequence[int] | None = None,
    subset: str = "kv",
    batch_size: int = 64,
    seed: int = 0,
    random_flip: bool | None = None,
    samples_per_example: int = 1,
    method: str = "auto",
    progress: bool = True,
    reduce: bool = True,
) -> FisherDiagonal:
    """The diagonal empirical Fisher over `ids` (default: the dataset's kept ids) for a weight subset,
    summed over processes when torch.distributed is initialised (each passes its own shard of ids)."""
    ids = [int(i) for i in (dataset.ids if ids is None else ids)]
    sums = accumulate_fisher(
        model,
        dataset,
        ids,
        subset,
        batch_size=batch_size,
        seed=seed,
        random_flip=random_flip,
        samples_per_example=samples_per_example,
        method=method,
        progress=progress,
    )
    if reduce:
        sums = all_reduce_fisher_sums(sums)
    flip = dataset.random_flip if random_flip is None else bool(random_flip)
    metadata = {
        "subset": subset,
        "seed": seed,
        "samples_per_example": samples_per_example,
        "num_examples": sums.count // samples_per_example,
        "random_flip": flip,
        "prediction_type": model.prediction_type,
        "num_train_timesteps": int(model.scheduler.config.num_train_timesteps),
        "latent_shape": list(model.latent_shape),
        "loss": "mean squared error over channels and pixels, real caption, uniform timestep",
    }
    return sums.finalize(metadata).validate()
