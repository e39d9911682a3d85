"""The deterministic per-sample loss every training example is scored with, before and after
unlearning: fixed timesteps and noise keyed by (seed, id, caption index, timestep, flip), so the two
sweeps see identical noise and the result does not depend on batch size, order or sharding.

Examples with fewer captions than asked for get NaN in the missing caption slots (rather than a
repeated caption, which would weight some captions twice): reduce over captions with `nanmean`, as
`unlearning_scores` does.

The noise (`noise`): "generator" (the default) seeds a CPU torch.Generator per combination
(`keyed_randn`, ~20 µs each: fine for the embedded world, every documented figure was measured with
it); "counter" draws a whole batch's noise in one call of `counter_randn` on the model's device, with
no Python per combination: the engine for GPUs and large training sets (the mscoco and abc presets).
The two give different noise and so different (equally valid) Monte-Carlo estimates of the losses: a
sweep is never mixed across them.

The engine: with `inputs` (compute/input_cache.py) the UNet's clean inputs and text states are read
from a per-model cache instead of being decoded and encoded in every sweep; `precision="bf16"` runs the
UNet forward under bfloat16 autocast (the loss itself in float32; it changes the numbers, so it is
part of a sweep's key); `SweepEngine` holds the settings that change the numbers by float rounding
only (torch.compile, channels-last memory format, the scaled-dot-product attention kernel). The losses
of a batch stay on the model's device until the sweep ends, so no batch waits for the host: the device
runs ahead while the next batch's indices and noise are being prepared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from diffusion_attribution.compute.input_cache import DTYPES, SweepInputs, encode_inputs
from diffusion_attribution.compute.sharded import check_stop, run_sharded
from diffusion_attribution.data.base import CaptionedImageDataset
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.objective.loss import (
    evaluation_mode,
    noisy_inputs,
    per_example_loss,
)
from diffusion_attribution.utils.seeding import counter_randn, keyed_randn

NOISES = ("counter", "generator")
PRECISIONS = ("fp32", "bf16")
INPUT_DTYPES = tuple(DTYPES)  # the input cache's dtypes
# method.attention -> torch's scaled-dot-product attention kernel ("default": torch picks per call).
ATTENTION_BACKENDS = {
    "default": None,
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def check_choice(name: str, value: Any, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"Unknown {name}={value!r}; options: {' | '.join(options)}.")
    return str(value)


def _check_timesteps(timesteps: Sequence[int], num_timesteps: int) -> list[int]:
    steps = [int(t) for t in timesteps]
    if not steps:
        raise ValueError("Give at least one timestep for the per-sample loss, e.g. [0, 100, ..., 900].")
    bad = [t for t in steps if not 0 <= t < num_timesteps]
    if bad:
        raise ValueError(f"Timesteps {bad} are outside the model's range 0..{num_timesteps - 1}.")
    return steps


@dataclass(frozen=True)
class SweepEngine:
    """How the sweep runs the UNet, in ways that change its losses by float rounding only (so not part
    of a sweep's cache key): `compile` wraps the UNet's forward in torch.compile (once per UNet, static
    shapes: the first batch of each batch size pays the compilation, and a short last batch is padded
    to the batch size), `channels_last` runs the UNet in channels-last memory format, `attention` pins
    the scaled-dot-product attention kernel (ATTENTION_BACKENDS; benchmarks/paper_scale.py times each
    on the device at hand)."""

    compile: bool = False
    channels_last: bool = False
    attention: str = "default"

    def __post_init__(self) -> None:
        check_choice("attention", self.attention, tuple(ATTENTION_BACKENDS))


def attention_kernel(name: str) -> contextlib.AbstractContextManager:
    """A context that restricts scaled-dot-product attention to the named kernel ("default": no
    restriction)."""
    backend = ATTENTION_BACKENDS[check_choice("attention", name, tuple(ATTENTION_BACKENDS))]
    return contextlib.nullcontext() if backend is None else sdpa_kernel(backend)


def _compiled_forward(unet: torch.nn.Module) -> Callable[..., Any]:
    """torch.compile of the UNet's forward, made once per UNet object and kept on it (the bound
    method, not the module, is compiled: the module keeps its children and forward hooks)."""
    compiled = unet.__dict__.get("_sweep_compiled_forward")
    if compiled is None:
        compiled = torch.compile(unet.forward, dynamic=False)
        unet.__dict__["_sweep_compiled_forward"] = compiled
    return compiled


@contextlib.contextmanager
def _unet_forward(
    model: TextToImageModel, engine: SweepEngine, precision: str
) -> Iterator[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
    """A function (noisy, timesteps, text states) -> UNet prediction with the engine's settings; the
    UNet's memory format is put back afterwards."""
    unet = model.unet
    if engine.channels_last:
        unet.to(memory_format=torch.channels_last)
    compiled = _compiled_forward(unet) if engine.compile else None
    autocast = (
        torch.autocast(device_type=model.device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )

    def forward(noisy: torch.Tensor, timesteps: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        if engine.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        try:
            with autocast, attention_kernel(engine.attention):
                if compiled is None:
                    return model.predict(noisy, timesteps, text_states)
                check_stop()  # the compiled forward skips the UNet's hooks (compute/sharded.py)
                return compiled(noisy, timesteps, encoder_hidden_states=text_states).sample
        except RuntimeError as error:
            if engine.attention == "default" or "No viable backend" not in str(error):
                raise
            raise ValueError(
                f"method.attention={engine.attention}: torch has no such attention kernel for these inputs "
                f"on {model.device} ({noisy.dtype}, precision {precision}). Use method.attention=default "
                "(torch picks) or math (runs everywhere)."
            ) from error

    try:
        yield forward
    finally:
        if engine.channels_last:
            unet.to(memory_format=torch.contiguous_format)


def _combinations(
    counts: Sequence[int], captions: Sequence[int], num_flips: int, num_steps: int
) -> torch.Tensor:
    """Every (row, slot, flip position, timestep position) [M, 4] whose caption (index `captions[slot]`)
    the row's example has, id-major: an image's combinations together, so each batch encodes few
    distinct images."""
    rows, flips, slots, steps = torch.meshgrid(
        torch.arange(len(counts)),
        torch.arange(num_flips),
        torch.arange(len(captions)),
        torch.arange(num_steps),
        indexing="ij",
    )
    grid = torch.stack((rows, slots, flips, steps), dim=-1).reshape(-1, 4)
    exists = (
        torch.as_tensor(list(captions), dtype=torch.long)[grid[:, 1]]
        < torch.as_tensor(list(counts), dtype=torch.long)[grid[:, 0]]
    )
    return grid[exists]


@torch.no_grad()
def per_sample_losses(
    model: TextToImageModel,
    dataset: CaptionedImageDataset,
    ids: Sequence[int],
    timesteps: Sequence[int],
    caption_indices: Sequence[int] | None = None,
    flips: Sequence[bool] = (False,),
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    noise: str = "generator",
    precision: str = "fp32",
    inputs: SweepInputs | None = None,
    engine: SweepEngine | None = None,
) -> torch.Tensor:
    """Loss [len(ids), num_captions, len(flips)] (float32, CPU), averaged over pixels and timesteps.

    `caption_indices=None` takes every caption of each example (num_captions = the largest count
    among `ids`); a caption index an example does not have gives NaN. The noise of (id, caption
    index c, timestep t, flip f) is row (seed, id, c, t, f) of `counter_randn` (noise="counter") or
    keyed_randn(latent shape, seed, id, c, t, f) (noise="generator"). All combinations are laid out in
    one list and run `batch_size` UNet forwards at a time. The clean inputs and text states come from
    `inputs` (the per-model cache), or are encoded first for `ids` (`encode_inputs`, the same values).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    check_choice("noise", noise, NOISES)
    check_choice("precision", precision, PRECISIONS)
    engine = engine or SweepEngine()
    ids = [int(i) for i in ids]
    flips = [bool(f) for f in flips]
    if not flips:
        raise ValueError("Give at least one flip setting: (False,) or (False, True).")
    steps = _check_timesteps(timesteps, int(model.scheduler.config.num_train_timesteps))
    counts = [len(dataset.source.captions(i)) for i in ids]
    if caption_indices is None:
        slots = list(range(max(counts, default=0)))
    else:
        slots = [int(c) for c in caption_indices]
        if not slots or min(slots) < 0:
            raise ValueError("caption_indices must be non-negative integers (or None for all captions).")
    losses = torch.full((len(ids), len(slots), len(flips), len(steps)), float("nan"), dtype=torch.float64)
    combos = _combinations(counts, slots, len(flips), len(steps))
    device = model.device
    dtype = model.unet.dtype
    ids_t, slots_t = torch.tensor(ids, dtype=torch.long), torch.tensor(slots, dtype=torch.long)
    steps_t, flips_t = torch.tensor(steps, dtype=torch.long), torch.tensor(flips, dtype=torch.long)
    if inputs is None:  # encoded here, each distinct image and caption once, as the cache holds them
        unique = sorted(set(ids))
        inputs = SweepInputs(
            ids=torch.tensor(unique, dtype=torch.long),
            flips=tuple(flips),
            caption_indices=tuple(slots),
            **encode_inputs(model, dataset, unique, flips, slots, batch_size),
        )
    store = inputs.inputs.device  # the host, or the model's device when the cache was moved there
    cache_rows = inputs.rows(ids).to(store)
    flip_cols, slot_cols = inputs.flip_positions(flips).to(store), inputs.caption_positions(slots).to(store)
    done: list[tuple[torch.Tensor, torch.Tensor]] = []  # (combinations, their losses on the device)
    with evaluation_mode(model), _unet_forward(model, engine, precision) as forward:
        for begin in tqdm(
            range(0, len(combos), batch_size), desc="per-sample loss", unit="batch", disable=not progress
        ):
            chunk = combos[begin : begin + batch_size]
            row, slot, fpos, tpos = chunk.unbind(1)
            cached = cache_rows[row.to(store)]
            latents = inputs.inputs[cached, flip_cols[fpos.to(store)]].to(device, dtype)
            text_states = inputs.text_states[cached, slot_cols[slot.to(store)]].to(device, dtype)
            if noise == "generator":
                draws = torch.stack(
                    [
                        keyed_randn(model.latent_shape, seed, ids[r], slots[c], steps[t], int(flips[f]))
                        for r, c, f, t in chunk.tolist()
                    ]
                )
            else:
                keys = torch.stack(
                    (
                        torch.full_like(row, int(seed)),
                        ids_t[row],
                        slots_t[slot],
                        steps_t[tpos],
                        flips_t[fpos],
                    ),
                    dim=1,
                )
                draws = counter_randn(keys.to(device), model.latent_shape)
            t = steps_t[tpos].to(device)
            noisy, target = noisy_inputs(model, latents, draws.to(device, latents.dtype), t)
            size = len(chunk)
            if engine.compile and size < batch_size:  # a last, short batch: padded, so that the
                pad = batch_size - size  # compiled UNet sees one shape (no recompilation)
                noisy, t, text_states = (
                    torch.cat([x, x[-1:].expand(pad, *x.shape[1:])]) for x in (noisy, t, text_states)
                )
            prediction = forward(noisy, t, text_states)[:size]
            done.append((chunk, per_example_loss(prediction, target).double()))
    if done:  # one copy to the host at the end
        chunks = torch.cat([c for c, _ in done])
        losses[chunks.unbind(1)] = torch.cat([v for _, v in done]).cpu()
    return losses.mean(dim=-1).to(torch.float32)


# ----------------------------------------------------------------------------------- loss sweep
@dataclass(frozen=True)
class SweepConfig:
    """What decides the numbers of a loss sweep (and so its cache key). `noise`, `precision` and
    `inputs` enter `to_dict` only when they differ from the first sweeps' (generator noise, fp32, float32
    inputs), so the sweeps cached before they existed keep their keys and are reused only by runs that
    reproduce them."""

    timesteps: tuple[int, ...]
    caption_indices: tuple[int, ...]
    flips: tuple[bool, ...] = (False,)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    noise: str = "generator"
    precision: str = "fp32"
    # the dtype the input cache holds the UNet's inputs in: rounding them changes the losses
    inputs: str = "float32"

    def __post_init__(self) -> None:
        check_choice("noise", self.noise, NOISES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("inputs", self.inputs, INPUT_DTYPES)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timesteps"] = [int(t) for t in self.timesteps]
        d["caption_indices"] = [int(c) for c in self.caption_indices]
        d["flips"] = [bool(f) for f in self.flips]
        if self.noise == "generator":
            del d["noise"]
        if self.precision == "fp32":
            del d["precision"]
        if self.inputs == "float32":
            del d["inputs"]
        return d


# What to do when a sweep directory was written with other noise or precision (compute/sharded.py
# names the keys that differ and adds these lines).
MISMATCH_HINTS = {
    "identity.sweep.noise": (
        "The directory's sweep used other noise: a sweep.json without 'noise' was written with the generator "
        "noise (keyed_randn), one with 'noise': 'counter' with counter_randn, and their losses cannot be "
        "mixed. To resume or reuse it, run with method.noise set to the noise recorded there (absent: "
        "generator); to recompute with the other noise, point the run at a new directory."
    ),
    "identity.sweep.inputs": (
        "The directory's sweep read inputs cached in another dtype (absent: float32). Run with the "
        "method.input_cache_dtype recorded there, or point the run at a new directory."
    ),
    "identity.sweep.precision": (
        "The directory's sweep ran the UNet at another precision (absent: fp32). Run with the "
        "method.precision recorded there, or point the run at a new directory."
    ),
}


def run_loss_sweep(
    model: TextToImageModel,
    dataset: CaptionedImageDataset,
    ids: Sequence[int] | np.ndarray,
    config: SweepConfig,
    out_dir: str | Path,
    identity: dict[str, Any],
    batch_size: int = 64,
    shard_size: int = 256,
    trainer_kwargs: dict[str, Any] | None = None,
    description: str = "loss sweep",
    inputs: SweepInputs | None = None,
    engine: SweepEngine | None = None,
) -> torch.Tensor:
    """Per-sample losses [len(ids), captions, flips] (see `per_sample_losses`), sharded and resumable.
    `inputs` and `engine` change how the losses are computed, not what they are (to float rounding),
    so they are not part of the directory's identity."""

    def shard_fn(shard_ids: np.ndarray) -> dict[str, torch.Tensor]:
        losses = per_sample_losses(
            model,
            dataset,
            shard_ids.tolist(),
            timesteps=list(config.timesteps),
            caption_indices=list(config.caption_indices),
            flips=list(config.flips),
            seed=config.seed,
            batch_size=batch_size,
            noise=config.noise,
            precision=config.precision,
            inputs=inputs,
            engine=engine,
        )
        return {"losses": losses.float()}

    shards = run_sharded(
        model,
        shard_fn,
        ids,
        out_dir,
        {**identity, "sweep": config.to_dict()},
        shard_size,
        trainer_kwargs,
        description,
        hints=MISMATCH_HINTS,
    )
    return torch.cat([s["losses"] for s in shards])
