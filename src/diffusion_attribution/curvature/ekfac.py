"""EK-FAC: an eigenvalue-corrected Kronecker-factored Fisher for the unlearning step (AbU+).

The diagonal Fisher treats every weight on its own. For a Linear layer y = W a (+ b) applied to
tokens, K-FAC approximates the layer's Fisher block by A ⊗ G, A = E[a aᵀ] over input tokens and
G = E[g gᵀ] over output gradients, whose eigenvectors Q_A, Q_G give a basis in which the Fisher is
nearly diagonal. EK-FAC (George et al. 2018; used by the authors' follow-up, FastGDA, as AbU+) keeps
that basis and replaces the Kronecker eigenvalues by the exact second moments of the per-sample
gradients rotated into it: Λ_ij = E_n[(Q_Gᵀ ∇W_n Q_A)_ij²]. The unlearning step is then

    ΔW = α · Q_G [ (Q_Gᵀ ∇W L(ẑ) Q_A) / (N (Λ + λ)) ] Q_Aᵀ,   λ = damping · mean(Λ),

the diagonal update of `unlearning.py` taken in the eigenbasis. With Q_A, Q_G = I it is exactly the
diagonal Fisher (a test checks this). A selected bias joins its weight as one more input column
(a ← [a, 1]).

Two passes over the training set, with the Fisher's own keyed draws (`fisher_draw`): the factors
A and G, then the eigenvalues in their eigenbasis. Both are sums written per shard through
`run_sharded` (a killed run resumes; shards add up in order, so the result does not depend on batch
size or the number of processes). Only Linear layers are supported: the subsets kv, cross_attn and
attn; `all` (convolutions, norms) keeps the diagonal Fisher.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from diffusion_attribution.autograd.linear_grads import capture_linear_io, tokens
from diffusion_attribution.compute.sharded import run_sharded
from diffusion_attribution.curvature.base import FisherError, FittedCurvature
from diffusion_attribution.data.base import CaptionedImageDataset
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.models.weight_subsets import select_parameters
from diffusion_attribution.objective.batches import training_loss_batches
from diffusion_attribution.objective.loss import evaluation_mode, per_example_loss
from diffusion_attribution.utils.atomic import (
    CorruptFileError,
    atomic_save_tensors,
    atomic_write_text,
    load_checked_tensors,
)

logger = logging.getLogger(__name__)

METADATA_KEY = "diffusion_attribution.ekfac"


@dataclass(frozen=True)
class LinearBlock:
    """One Linear layer of the selection: its module path and the names of its selected weights."""

    module: str
    weight: str
    bias: str | None

    @property
    def names(self) -> list[str]:
        return [self.weight] + ([self.bias] if self.bias else [])


def linear_blocks(unet: nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, LinearBlock]:
    """The selected parameters grouped by their Linear layer (module path -> block), in model order.
    Raises ValueError, naming them, if some selected parameters are not a Linear layer's weight or
    bias, or a bias is selected without its weight."""
    weights: dict[str, str] = {}
    biases: dict[str, str] = {}
    other = []
    for name in params:
        module_name, _, attr = name.rpartition(".")
        module = unet.get_submodule(module_name) if module_name else unet
        if isinstance(module, nn.Linear) and attr == "weight":
            weights[module_name] = name
        elif isinstance(module, nn.Linear) and attr == "bias":
            biases[module_name] = name
        else:
            other.append(name)
    if other:
        raise ValueError(
            f"EK-FAC covers Linear layers only, but {len(other)} selected parameters are not a Linear "
            f"layer's weight or bias (e.g. {other[:3]}). Use method.params=kv, cross_attn or attn with "
            "method/curvature=ekfac, or method/curvature=diagonal (the diagonal Fisher) for these weights."
        )
    orphans = sorted(set(biases) - set(weights))
    if orphans:
        raise ValueError(f"EK-FAC needs each selected bias's weight selected too; missing for {orphans[:3]}.")
    return {m: LinearBlock(m, w, biases.get(m)) for m, w in weights.items()}


def _block_inputs(a: torch.Tensor, block: LinearBlock) -> torch.Tensor:
    """A layer's input tokens [B, n, I] (float64), with a column of ones when its bias is selected."""
    a3 = tokens(a, torch.float64)
    if block.bias is None:
        return a3
    return torch.cat([a3, torch.ones_like(a3[..., :1])], dim=-1)


def _gradient_matrix(gradients: Mapping[str, torch.Tensor], block: LinearBlock) -> torch.Tensor:
    """The block's gradient as one [O, I(+1)] matrix (bias as the last column)."""
    weight = gradients[block.weight].double()
    if block.bias is None:
        return weight
    return torch.cat([weight, gradients[block.bias].double()[:, None]], dim=1)


def _per_sample_matrices(calls: list[tuple[torch.Tensor, torch.Tensor]], block: LinearBlock) -> torch.Tensor:
    """Exact per-example gradients [B, O, I(+1)] of the block from its captured calls."""
    total = None
    for a, g in calls:
        part = torch.einsum("bno,bni->boi", tokens(g, torch.float64), _block_inputs(a, block))
        total = part if total is None else total + part
    assert total is not None
    return total


def _selection(
    model: TextToImageModel, params: str | Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, LinearBlock]]:
    selected = select_parameters(model.unet, params) if isinstance(params, str) else dict(params)
    return selected, linear_blocks(model.unet, selected)


def _training_loss(
    model: TextToImageModel, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    return per_example_loss(model.predict(noisy, t, text), target)


def _captured_batches(
    model: TextToImageModel,
    dataset: CaptionedImageDataset,
    ids: Sequence[int],
    selected: Mapping[str, torch.Tensor],
    blocks: Mapping[str, LinearBlock],
    batch_size: int,
    seed: int,
    samples_per_example: int,
    progress: bool,
    description: str,
) -> Iterator[dict[str, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """One pass over `ids` with the Fisher's draws: per batch, each block's captured (input, output
    gradient) calls of the training loss."""
    if samples_per_example < 1:
        raise ValueError("samples_per_example must be at least 1.")
    modules = {m: model.unet.get_submodule(m) for m in blocks}
    wrt = [selected[block.weight] for block in blocks.values()]
    work = [(int(i), s) for i in ids for s in range(samples_per_example)]
    bar = tqdm(total=len(work), desc=description, unit="sample", disable=not progress)
    with evaluation_mode(model):
        for chunk, *batch in training_loss_batches(
            model, dataset, work, batch_size, seed, dataset.random_flip
        ):
            yield capture_linear_io(model.unet, modules, wrt, partial(_training_loss, model, *batch))
            bar.update(len(chunk))
    bar.close()


def _add(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    sums[key] = value if key not in sums else sums[key] + value


def accumulate_factors(
    model: TextToImageModel,
    dataset: CaptionedImageDataset,
    ids: Sequence[int],
    params: str | Mapping[str, torch.Tensor] = "kv",
    batch_size: int = 64,
    seed: int = 0,
    samples_per_example: int = 1,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Pass 1 over `ids`: per layer the sums of a aᵀ over input tokens ("A.<module>") and of g gᵀ
    over output-gradient tokens ("G.<module>"), float64, and the number of samples ("count")."""
    selected, blocks = _selection(model, params)
    sums: dict[str, torch.Tensor] = {}
    passes = _captured_batches(
        model,
        dataset,
        ids,
        selected,
        blocks,
        batch_size,
        seed,
        samples_per_example,
        progress,
        "EK-FAC factors",
    )
    for calls in passes:
        for module, block in blocks.items():
            for a, g in calls[module]:
                a2 = _block_inputs(a, block).flatten(0, 1)
                g2 = tokens(g, torch.float64).flatten(0, 1)
                _add(sums, f"A.{module}", a2.T @ a2)
                _add(sums, f"G.{module}", g2.T @ g2)
    sums["count"] = torch.tensor(len(ids) * samples_per_example, dtype=torch.float64)
    return sums


def eigenbases(factor_sums: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (Q_A, Q_G), the eigenvectors (float64 columns) of each layer's summed factors."""
    bases = {}
    for key in factor_sums:
        if key.startswith("A."):
            module = key[2:]
            q_in = torch.linalg.eigh(factor_sums[key].double()).eigenvectors
            q_out = torch.linalg.eigh(factor_sums[f"G.{module}"].double()).eigenvectors
            bases[module] = (q_in, q_out)
    return bases


def accumulate_eigenvalues(
    model: TextToImageModel,
    dataset: CaptionedImageDataset,
    ids: Sequence[int],
    params: str | Mapping[str, torch.Tensor],
    bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    batch_size: int = 64,
    seed: int = 0,
    samples_per_example: int = 1,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Pass 2 over `ids`: per layer Σ_n (Q_Gᵀ ∇W_n Q_A)² ("L.<module>", float64) and "count"."""
    selected, blocks = _selection(model, params)
    missing = sorted(set(blocks) - set(bases))
    if missing:
        raise ValueError(f"No eigenbasis for {missing[:3]}: compute the factors for the same weights first.")
    device = model.device
    rotations = {m: (q_in.to(device), q_out.to(device)) for m, (q_in, q_out) in bases.items()}
    sums: dict[str, torch.Tensor] = {}
    passes = _captured_batches(
        model,
        dataset,
        ids,
        selected,
        blocks,
        batch_size,
        seed,
        samples_per_example,
        progress,
        "EK-FAC eigenvalues",
    )
    for calls in passes:
        for module, block in blocks.items():
            q_in, q_out = rotations[module]
            rotated = q_out.T @ _per_sample_matrices(calls[module], block) @ q_in
            _add(sums, f"L.{module}", rotated.pow(2).sum(0))
    sums["count"] = torch.tensor(len(ids) * samples_per_example, dtype=torch.float64)
    return sums


# ------------------------------------------------------------------------------------- factors
@dataclass
class EKFAC:
    """Per Linear layer (module path): eigenbases q_in [I', I'], q_out [O, O] and corrected eigenvalues
    [O, I'] (I' = I, or I + 1 when the bias is selected), with the parameter names they cover."""

    blocks: dict[str, LinearBlock]
    q_in: dict[str, torch.Tensor]
    q_out: dict[str, torch.Tensor]
    eigenvalues: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [name for block in self.blocks.values() for name in block.names]

    def mean(self) -> float:
        """Mean eigenvalue over every entry of every layer (the scale `damping` is relative to)."""
        total = sum(float(v.double().sum()) for v in self.eigenvalues.values())
        return total / sum(v.numel() for v in self.eigenvalues.values())

    def validate(self, params: Mapping[str, torch.Tensor] | None = None) -> EKFAC:
        """Raise FisherError unless the eigenvalues are finite, non-negative and not all zero; with
        `params`, also unless the factors cover exactly those weights, with matching shapes."""
        if not self.blocks:
            raise FisherError("The EK-FAC factors are empty: compute them for the weight subset.")
        for module, value in self.eigenvalues.items():
            if not bool(torch.isfinite(value).all()):
                raise FisherError(
                    f"The EK-FAC eigenvalues of {module} hold NaN/inf: the model or its loss overflowed. "
                    "Check the checkpoint for NaN, compute in float32, then recompute (delete the cached file)."
                )
            if bool((value < 0).any()):
                raise FisherError(f"The EK-FAC eigenvalues of {module} are negative: the file is corrupt.")
        if all(not bool(v.any()) for v in self.eigenvalues.values()):
            raise FisherError(
                "Every EK-FAC eigenvalue is zero: the training loss does not depend on the selected weights."
            )
        if params is not None:
            if sorted(self.names) != sorted(params):
                raise FisherError(
                    "The EK-FAC factors were computed for other weights "
                    f"({len(self.names)} tensors, not the {len(params)} selected). Recompute them with the "
                    "same weight subset and model as the unlearning."
                )
            for module, block in self.blocks.items():
                rows, cols = params[block.weight].shape
                expected = (rows, cols + (block.bias is not None))
                if tuple(self.eigenvalues[module].shape) != expected:
                    raise FisherError(
                        f"EK-FAC shapes differ from the model's for {module}: it belongs to another "
                        "architecture. Recompute it for this checkpoint."
                    )
        return self

    def precondition(
        self, gradients: Mapping[str, torch.Tensor], num_train: float, damping: float, per_layer: bool = False
    ) -> dict[str, torch.Tensor]:
        """Q_G [(Q_Gᵀ ∇ Q_A) / (N (Λ + λ))] Q_Aᵀ per layer, λ = damping · mean(Λ) over every layer (or,
        `per_layer`, over that layer's own Λ); float32, by name."""
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}.")
        global_lam = damping * self.mean()
        out: dict[str, torch.Tensor] = {}
        for module, block in self.blocks.items():
            lam = damping * float(self.eigenvalues[module].double().mean()) if per_layer else global_lam
            matrix = _gradient_matrix(gradients, block)
            device = matrix.device
            q_in, q_out = (
                self.q_in[module].to(device, torch.float64),
                self.q_out[module].to(device, torch.float64),
            )
            eigen = self.eigenvalues[module].to(device, torch.float64)
            step = q_out @ ((q_out.T @ matrix @ q_in) / (float(num_train) * (eigen + lam))) @ q_in.T
            if block.bias is None:
                out[block.weight] = step.float()
            else:
                out[block.weight], out[block.bias] = step[:, :-1].float(), step[:, -1].float()
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for module in self.blocks:
            tensors[f"q_in.{module}"] = self.q_in[module].double()
            tensors[f"q_out.{module}"] = self.q_out[module].double()
            tensors[f"eigenvalues.{module}"] = self.eigenvalues[module].double()
        blocks = [[b.module, b.weight, b.bias] for b in self.blocks.values()]
        header = {"metadata": self.metadata, "blocks": blocks}
        atomic_save_tensors(path, tensors, {METADATA_KEY: json.dumps(header, default=str)})
        atomic_write_text(path.with_suffix(".json"), json.dumps(header, indent=2, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> EKFAC:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"No EK-FAC file at {path}. Compute one with compute_ekfac(...).save(path)."
            )
        fix = "Delete it (and its .json) so that the EK-FAC factors are recomputed."
        tensors, raw = load_checked_tensors(path, fix, str(device), require_checksum=False)
        try:
            header = json.loads(raw[METADATA_KEY])
            blocks = {m: LinearBlock(m, w, b) for m, w, b in header["blocks"]}
            q_in = {m: tensors[f"q_in.{m}"] for m in blocks}
            q_out = {m: tensors[f"q_out.{m}"] for m in blocks}
            eigenvalues = {m: tensors[f"eigenvalues.{m}"] for m in blocks}
        except (KeyError, ValueError, TypeError) as error:
            raise CorruptFileError(path, f"its header does not match its tensors ({error!r})", fix) from error
        return cls(blocks, q_in, q_out, eigenvalues, header["metadata"])


def _finalize(
    blocks: dict[str, LinearBlock],
    bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    eigen_sums: Mapping[str, torch.Tensor],
    metadata: dict[str, Any],
) -> EKFAC:
    count = float(eigen_sums["count"])
    if count <= 0:
        raise FisherError("No examples went into the EK-FAC factors: pass a non-empty list of ids.")
    return EKFAC(
        blocks,
        {m: bases[m][0] for m in blocks},
        {m: bases[m][1] for m in blocks},
        {m: eigen_sums[f"L.{m}"] / count for m in blocks},
        {**metadata, "num_samples": int(count)},
    ).validate()


def compute_ekfac(
    model: TextToImageModel,
    dataset: CaptionedImageDataset,
    ids: Sequence[int] | None = None,
    subset: str = "kv",
    batch_size: int = 64,
    seed: int = 0,
    samples_per_example: int = 1,
    progress: bool = True,
) -> EKFAC:
    """EK-FAC over `ids` (default: the dataset's kept ids) in this process (see `run_ekfac` for the
    sharded, resumable, multi-process version, which gives the same numbers)."""
    ids = [int(i) for i in (dataset.ids if ids is None else ids)]
    selected, blocks = _selection(model, subset)
    args = (model, dataset, ids, selected)
    kwargs = {"batch_size": batch_size, "seed": seed, "samples_per_example": samples_per_example}
    bases = eigenbases(accumulate_factors(*args, **kwargs, progress=progress))
    eigen_sums = accumulate_eigenvalues(*args, bases, **kwargs, progress=progress)
    metadata = _metadata(model, dataset, subset, seed, samples_per_example, len(ids))
    return _finalize(blocks, bases, eigen_sums, metadata)


def _metadata(
    model: TextToImageModel,
    dataset: CaptionedImageDataset,
    subset: str,
    seed: int,
    samples_per_example: int,
    num_examples: int,
) -> dict[str, Any]:
    return {
        "subset": subset,
        "seed": seed,
        "samples_per_example": samples_per_example,
        "num_examples": num_examples,
        "random_flip": dataset.random_flip,
        "prediction_type": model.prediction_type,
        "preconditioner": "ekfac",
    }


def _sum_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for shard in shards:  # in shard order: the float64 sum does not depend on who computed what
        for key, value in shard.items():
            total[key] = value.double() if key not in total else total[key] + value.double()
    return total


def run_ekfac(
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
) -> EKFAC:
    """EK-FAC over `ids` in two sharded passes (`<out_dir>/factors`, `<out_dir>/eigenvalues`), each
    resumable and split over processes by the trainer; the same numbers as `compute_ekfac`."""
    out_dir = Path(out_dir)
    ids = np.asarray(ids, dtype=np.int64)
    selected, blocks = _selection(model, subset)
    kwargs = {"batch_size": batch_size, "seed": seed, "samples_per_example": samples_per_example}
    config = {"subset": subset, **kwargs}
    config.pop("batch_size")
    # Lightning predicts under inference_mode, in which the backward pass of the hooks cannot run.
    trainer_kwargs = {**(trainer_kwargs or {}), "inference_mode": False}
    started = time.perf_counter()

    def factor_shard(shard_ids: np.ndarray) -> dict[str, torch.Tensor]:
        return accumulate_factors(model, dataset, shard_ids.tolist(), selected, **kwargs, progress=False)

    factor_identity = {**identity, "ekfac": {**config, "pass": "factors"}}
    factors = _sum_shards(
        run_sharded(
            model,
            factor_shard,
            ids,
            out_dir / "factors",
            factor_identity,
            shard_size,
            trainer_kwargs,
            "EK-FAC factors",
        )
    )
    bases = eigenbases(factors)

    def eigen_shard(shard_ids: np.ndarray) -> dict[str, torch.Tensor]:
        return accumulate_eigenvalues(
            model, dataset, shard_ids.tolist(), selected, bases, **kwargs, progress=False
        )

    eigen_identity = {**identity, "ekfac": {**config, "pass": "eigenvalues"}}
    eigen_sums = _sum_shards(
        run_sharded(
            model,
            eigen_shard,
            ids,
            out_dir / "eigenvalues",
            eigen_identity,
            shard_size,
            trainer_kwargs,
            "EK-FAC eigenvalues",
        )
    )
    logger.info("EK-FAC over %d examples in %.1f s", len(ids), time.perf_counter() - started)
    metadata = {
        **_metadata(model, dataset, subset, seed, samples_per_example, len(ids)),
        "identity": identity,
    }
    return _finalize(blocks, bases, eigen_sums, metadata)


# ------------------------------------------------------------------------------------- curvature
class EKFACCurvature(FittedCurvature):
    """`method/curvature=ekfac` (AbU+): the diagonal step taken in the eigenbasis of a Kronecker-factored
    Fisher of each selected Linear layer, with its eigenvalues corrected to the per-sample gradients'
    second moments (module docstring); λ = damping · mean(Λ) over every selected layer."""

    name = "ekfac"

    run_fit = staticmethod(run_ekfac)
    load_factors = staticmethod(EKFAC.load)

    def precondition(self, gradient: Mapping[str, torch.Tensor], num_train: float) -> dict[str, torch.Tensor]:
        return self._fitted().precondition(
            gradient, float(num_train), self.damping, per_layer=self.damping_scope == "layer"
        )
