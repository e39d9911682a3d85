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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from diffusion_attribution.autograd.per_sample import per_sample_gradients, vmap_friendly_attention
from diffusion_attribution.compute.sharded import run_sharded
from diffusion_attribution.curvature.base import FisherError, FittedCurvature
from diffusion_attribution.data.base import CaptionedImageDataset
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.models.weight_subsets import select_parameters
from diffusion_attribution.objective.batches import training_loss_batches
from diffusion_attribution.objective.loss import evaluation_mode
from diffusion_attribution.utils.atomic import (
    CorruptFileError,
    atomic_save_tensors,
    atomic_write_text,
    load_checked_tensors,
)

logger = logging.getLogger(__name__)


METADATA_KEY = "diffusion_attribution.fisher"


NAMES_KEY = "diffusion_attribution.fisher.names"  # safetensors sorts tensors; keep the model's order


FISHER_METHODS = ("auto", "vmap", "loop")


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
        fix = "Delete it (and its .json) so that the Fisher is recomputed."
        tensors, header = load_checked_tensors(path, fix, str(device), require_checksum=False)
        try:
            names = json.loads(header[NAMES_KEY]) if NAMES_KEY in header else sorted(tensors)
            values = {name: tensors[name] for name in names}
            metadata = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else {}
        except (KeyError, ValueError) as error:
            raise CorruptFileError(path, f"its header does not match its tensors ({error!r})", fix) from error
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


def _resolve_params(model: TextToImageModel, params: str | Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return select_parameters(model.unet, params) if isinstance(params, str) else dict(params)


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


def run_fisher(
    model: TextToImageModel,
    dataset: CaptionedImageDataset,
    ids: Sequence[int] | np.ndarray,
    subset: str,
    out_dir: str | Path,
    identity: dict[str, Any],
    batch_size: int = 64,
    seed: int = 0,
    samples_per_example: int = 1,
    shard_size: int = 512,
    trainer_kwargs: dict[str, Any] | None = None,
) -> FisherDiagonal:
    """The diagonal empirical Fisher over `ids`: per-shard sums of squared per-sample gradients,
    written as they finish (a killed run resumes), then summed in shard order."""

    def shard_fn(shard_ids: np.ndarray) -> dict[str, torch.Tensor]:
        sums = accumulate_fisher(
            model,
            dataset,
            shard_ids.tolist(),
            subset,
            batch_size=batch_size,
            seed=seed,
            samples_per_example=samples_per_example,
            progress=False,
        )
        return {**{f"sum.{n}": s for n, s in sums.sums.items()}, "count": torch.tensor(sums.count)}

    config = {"subset": subset, "seed": seed, "samples_per_example": samples_per_example}
    shards = run_sharded(
        model, shard_fn, ids, out_dir, {**identity, "fisher": config}, shard_size, trainer_kwargs, "Fisher"
    )
    total: FisherSums | None = None
    for shard in shards:
        part = FisherSums(
            {k.removeprefix("sum."): v.double() for k, v in shard.items() if k.startswith("sum.")},
            int(shard["count"]),
        )
        total = part if total is None else total.merge(part)
    assert total is not None
    metadata = {
        **config,
        "num_examples": total.count // samples_per_example,
        "random_flip": dataset.random_flip,
        "prediction_type": model.prediction_type,
        "identity": identity,
    }
    return total.finalize(metadata).validate()


# ------------------------------------------------------------------------------------- curvature
class DiagonalCurvature(FittedCurvature):
    """`method/curvature=diagonal` (the paper's AbU): P = N·(F + λ), F the diagonal empirical Fisher of
    the selected weights, λ = damping · mean(F) over them. The damping is relative to the Fisher's own
    scale, so it means the same for any N: a weight with F = 0 moves at most 1/damping times as far as
    a weight of average Fisher."""

    name = "diagonal"

    run_fit = staticmethod(run_fisher)
    load_factors = staticmethod(FisherDiagonal.load)

    @classmethod
    def from_fisher(cls, fisher: FisherDiagonal, **settings: Any) -> DiagonalCurvature:
        """This curvature with an already computed Fisher (e.g. from `compute_fisher`)."""
        return cls.from_factors(fisher, **settings)  # type: ignore[return-value]

    def _damping_value(self, names: Sequence[str]) -> float:
        return self.damping * self._fitted().mean(names)

    def precondition(self, gradient: Mapping[str, torch.Tensor], num_train: float) -> dict[str, torch.Tensor]:
        fisher = self._fitted()
        names = list(gradient)
        if self.damping_scope == "layer":  # a layer: the weight and bias of one module
            groups: dict[str, list[str]] = {}
            for name in names:
                groups.setdefault(name.rpartition(".")[0], []).append(name)
            lams = {name: self._damping_value(group) for group in groups.values() for name in group}
        else:
            lam = self._damping_value(names)
            lams = dict.fromkeys(names, lam)
        out = {}
        for name in names:
            value = fisher[name].to(gradient[name].device, torch.float64)
            scale = (1.0 / (float(num_train) * (value + lams[name]))).to(torch.float32)
            out[name] = gradient[name] * scale
        return out


class NewtonCurvature(DiagonalCurvature):
    """`method/curvature=newton`: the undamped diagonal step of the paper's reference, P = N·F. Any
    Fisher entry equal to zero among the selected weights is an error (the step would be infinite)."""

    name = "newton"

    def __init__(self, samples_per_example: int = 1) -> None:
        super().__init__(0.0, samples_per_example)

    def settings(self) -> dict[str, Any]:  # the same fitted Fisher as the diagonal curvature
        return {**super().settings(), "curvature": DiagonalCurvature.name}

    def _damping_value(self, names: Sequence[str]) -> float:
        fisher = self._fitted()
        zeros = {n: int((fisher[n] == 0).sum()) for n in names}
        zeros = {n: z for n, z in zeros.items() if z}
        if zeros:
            example = next(iter(zeros))
            raise FisherError(
                f"method/curvature=newton divides by the Fisher, but {sum(zeros.values())} selected entries "
                f"are zero (e.g. {zeros[example]} in {example}). Use method/curvature=diagonal with "
                "method.curvature.damping > 0 instead."
            )
        return 0.0
