"""`method=trak|dtrak|journeytrak`: attribution by projected gradients (TRAK, Park et al. 2023;
D-TRAK, Zheng et al. 2024; JourneyTRAK, Georgiev et al. 2023).

Each example's feature φ(z) = P ∇θ f(z; θ): the gradient of an output function f w.r.t. a weight
subset, averaged over fixed timesteps (and captions, flips), randomly projected to k dimensions (P:
autograd/projection.py, generated blockwise from the seed). With Φ the [N_train, k] features of the
model's training examples,

    score(q, z) = φ(q)ᵀ (ΦᵀΦ + λI)⁻¹ φ(z)      (higher = more influential)

- trak: f = the training loss, for the training examples and the query;
- dtrak: f = ‖model output‖² (averaged over pixels), for both;
- journeytrak: training side as trak; the query's f is the loss at one step of its OWN sampling
  trajectory (default t = 400, the nearest step the sampler visits): x_t is the latent the sampler
  held there, the target the noise that maps the final latent x̂₀ to x_t,
  ε = (x_t − √ᾱ_t x̂₀)/√(1 − ᾱ_t) (as v for a v-prediction model). The query must have been generated
  by the model (prompt + seed): its trajectory is regenerated and checked against its final latent.

prepare: Φ for every example of the source (excluded ids too, so that every column is scored) is
computed once per (model, data, train-side settings) as a sharded, resumable, DDP-split run
(`run_sharded`); each shard's Φ rows are a float32 .npy file written atomically beside the shard
marker (store.py), read back memory-mapped one shard at a time (never all of Φ in memory). The kernel (kernel.py) is over
the model's TRAINING ids (`datamodule.train_ids`); its Cholesky factor is cached beside Φ, keyed by λ
and the ids, in the smaller of two forms that give the same scores: ΦᵀΦ + λI (k x k, paper scale) or,
when k exceeds the number of training examples, ΦΦᵀ + λI (N x N, solved with the Woodbury identity).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from diffusion_attribution.attribution.base import AttributionContext, Attributor
from diffusion_attribution.attribution.checks import (
    captions_setting,
    check_caption_indices,
    check_timesteps,
    flips_setting,
    float_setting,
    int_setting,
    timesteps_setting,
)
from diffusion_attribution.attribution.queries import Query, QueryError
from diffusion_attribution.attribution.trak.kernel import (
    example_gram_factor,
    gram_factor,
    kernel_solve,
    woodbury_solve,
)
from diffusion_attribution.attribution.trak.store import FeatureStore
from diffusion_attribution.autograd.output_gradients import (
    GRADIENT_METHODS,
    point_gradient_means,
    resolve_method,
    training_gradient_means,
)
from diffusion_attribution.autograd.projection import PROJECTION_KINDS, BlockwiseProjection
from diffusion_attribution.compute.sharded import run_sharded
from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.models.sampling import generate, sampler_timesteps
from diffusion_attribution.models.weight_subsets import (
    SUBSETS,
    count_parameters,
    describe_subsets,
    select_parameters,
)
from diffusion_attribution.objective.loss import evaluation_mode, mask_to_latent, noisy_inputs
from diffusion_attribution.utils.atomic import atomic_save_tensors
from diffusion_attribution.utils.fingerprint import data_fingerprint, hash_json, model_fingerprint
from diffusion_attribution.utils.seeding import Stream, keyed_randn

log = logging.getLogger(__name__)


# The query's noise stream (its points at the train-side timesteps), apart from every other stream.
PROJECTION_DEVICES = ("cpu", "cuda")


# How a published λ is entered: our projection P has N(0, 1)/√k entries (inner products preserved), so
# λ is in projected-gradient units. A paper's λ converts to ours exactly (the scores are equal):
DAMPING_CONVENTIONS = {
    "projected": "λ as the kernel uses it (projection scaled by 1/√k): method.damping is taken as is",
    "unscaled_projection": "λ for an unscaled N(0, 1) projector, as the D-TRAK reference code: ours = λ / k",
    "trak_library": "λ of the TRAK library (unscaled projector, features divided by √d): ours = λ · d / k",
}


def kernel_damping(damping: float, convention: str, dim: int, num_weights: int) -> float:
    """The λ of (ΦᵀΦ + λI)⁻¹ for our scaled projection, from a λ given in `convention` (k = `dim`
    projected dimensions, d = `num_weights` gradient dimensions)."""
    if convention == "unscaled_projection":
        return float(damping) / dim
    if convention == "trak_library":
        return float(damping) * num_weights / dim
    return float(damping)


# --------------------------------------------------------------------------------- attributor
class TRAKAttributor(Attributor):
    """TRAK: f = the diffusion training loss (see the module docstring; dtrak/journeytrak below)."""

    name = "trak"
    default_damping = 0.005  # method.damping when not given (conf/method/trak.yaml sets the same)
    train_output = "loss"
    query_output = "loss"

    def __init__(
        self,
        params: str = "kv",
        projection_dim: int = 4096,
        projection: str = "gaussian",
        projection_device: str = "cpu",
        block_rows: int = 1024,
        damping: float | None = None,
        damping_convention: str = "projected",
        timesteps: Sequence[int] | None = None,
        num_timesteps: int = 10,
        captions: Sequence[int] | int | str = 1,
        flips: str | Sequence[bool] = "auto",
        batch_size: int = 64,
        shard_size: int = 256,
        buffer_mb: float = 256,
        gradient_method: str = "auto",
        store_dir: str | None = None,
    ) -> None:
        super().__init__()
        # Checked when the config is read, before any query is generated or gradient computed.
        if params not in SUBSETS:
            raise ValueError(f"Unknown method.params={params!r}. Options: {describe_subsets()}.")
        if projection not in PROJECTION_KINDS:
            raise ValueError(f"Unknown method.projection={projection!r}; options: {PROJECTION_KINDS}.")
        if projection_device not in PROJECTION_DEVICES:
            raise ValueError(
                f"Unknown method.projection_device={projection_device!r}; options: {PROJECTION_DEVICES} (cuda: "
                "draw the random projection on the GPU, much faster at paper scale)."
            )
        if gradient_method not in GRADIENT_METHODS:
            raise ValueError(
                f"Unknown method.gradient_method={gradient_method!r}; options: {GRADIENT_METHODS}."
            )
        projection_dim = int_setting("method.projection_dim", projection_dim)
        damping = float_setting(
            "method.damping (λ)", self.default_damping if damping is None else damping, "positive and finite"
        )
        if damping_convention not in DAMPING_CONVENTIONS:
            options = "; ".join(f"{k}: {v}" for k, v in DAMPING_CONVENTIONS.items())
            raise ValueError(f"Unknown method.damping_convention={damping_convention!r}. Options: {options}.")
        batch_size = int_setting("method.batch_size", batch_size)
        shard_size = int_setting("method.shard_size", shard_size)
        block_rows = int_setting("method.block_rows", block_rows)
        buffer_mb = float_setting("method.buffer_mb", buffer_mb)
        self.params = params
        self.projection_dim = int(projection_dim)
        self.projection_kind = projection
        self.projection_device = projection_device
        self.block_rows = int(block_rows)
        self.damping = float(damping)
        self.damping_convention = damping_convention
        self.timesteps = timesteps_setting("method.timesteps", timesteps)
        self.num_timesteps = int_setting("method.num_timesteps", num_timesteps)
        # Plain values (Hydra passes lists as ListConfig), as ranking.json records them.
        self.captions = captions_setting("method.captions", captions)
        self.flips = flips_setting("method.flips", flips)
        self.batch_size = int(batch_size)
        self.shard_size = int(shard_size)
        self.buffer_mb = float(buffer_mb)
        self.gradient_method = gradient_method
        self.store_dir = store_dir

    # ------------------------------------------------------------------------------- settings
    def _resolve_settings(self, model: TextToImageModel, datamodule: CaptionedImageDataModule) -> None:
        """Timesteps, caption indices and flips on this model and data; settings the model or the data
        cannot honour (a timestep past the scheduler's, a caption no example has) are refused."""
        self.resolved_timesteps = check_timesteps(
            "method.timesteps", self.timesteps, self.num_timesteps, model
        )
        self.caption_indices = check_caption_indices("method.captions", self.captions, datamodule)
        if self.flips == "auto":
            self.resolved_flips = [False, True] if datamodule.random_flip else [False]
        else:
            self.resolved_flips = list(self.flips)

    def check_settings(self, model: TextToImageModel, datamodule: CaptionedImageDataModule) -> None:
        """The settings' checks against the model and the data, before any work (jobs/attribute.py)."""
        self._resolve_settings(model, datamodule)

    def train_side_config(self) -> dict[str, Any]:
        """What decides Φ (and so the store's key): not the batch or shard sizes."""
        return {
            "output": self.train_output,
            "params": self.params,
            "timesteps": self.resolved_timesteps,
            "caption_indices": self.caption_indices,
            "flips": self.resolved_flips,
            "seed": self.seed,
            "projection": self.projection.describe(),
        }

    def config(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "train_output": self.train_output,
            "query_output": self.query_output,
            "params": self.params,
            "projection_dim": self.projection_dim,
            "projection": self.projection_kind,
            "projection_device": self.projection_device,
            "block_rows": self.block_rows,
            "damping": self.damping,
            "damping_convention": self.damping_convention,
            "kernel_damping": getattr(self, "kernel_damping", None),
            "flips": self.flips,
        }
        if hasattr(self, "resolved_timesteps"):
            settings.update(
                timesteps=self.resolved_timesteps,
                caption_indices=self.caption_indices,
                flips=self.resolved_flips,
                num_weights=self.num_weights,
                store=str(self.store),
            )
        return settings

    # -------------------------------------------------------------------------------- prepare
    def prepare(
        self, model: TextToImageModel, datamodule: CaptionedImageDataModule, context: AttributionContext
    ) -> None:
        self.model, self.datamodule, self.context = model, datamodule, context
        self.seed = int(context.seed)
        self.selected = select_parameters(model.unet, self.params)
        self.num_weights = count_parameters(self.selected)
        self._resolve_settings(model, datamodule)
        # Raises (naming the limit) when projection_dim exceeds the subset's weight count.
        self.projection = BlockwiseProjection(
            {name: p.shape for name, p in self.selected.items()},
            self.projection_dim,
            seed=self.seed,
            kind=self.projection_kind,
            block_rows=self.block_rows,
            device=self.projection_device,
        )
        self.method_used = resolve_method(model.unet, self.selected, self.gradient_method)
        self.kernel_damping = kernel_damping(
            self.damping, self.damping_convention, self.projection_dim, self.num_weights
        )
        self.all_ids = np.arange(datamodule.num_examples)
        self.dataset = datamodule.full_dataset()
        self.train_ids = np.asarray(datamodule.train_ids, dtype=np.int64)
        self.identity = {
            "model": model_fingerprint(model),
            "data": data_fingerprint(datamodule),
            "train_side": self.train_side_config(),
        }
        key = hash_json(self.identity)
        self.store = Path(self.store_dir) if self.store_dir else context.cache_dir / "trak" / key
        self.features = FeatureStore(
            self.store, self.identity, self.shard_size, self.projection_dim, self.name
        )
        self.features.check()
        per_example = len(self.resolved_timesteps) * len(self.caption_indices) * len(self.resolved_flips)
        log.info(
            "%s train side: %d weights (%s, %s gradients of %s) -> %d dims; %d examples x up to %d points; "
            "store %s",
            self.name,
            self.num_weights,
            self.params,
            self.method_used,
            self.train_output,
            self.projection_dim,
            len(self.all_ids),
            per_example,
            self.store,
        )
        started = time.perf_counter()
        markers = run_sharded(
            model,
            self._shard_features,
            self.all_ids,
            self.store,
            self.identity,
            self.shard_size,
            # Lightning predicts under inference_mode, in which no backward pass can run.
            {**context.trainer_kwargs, "inference_mode": False},
            f"{self.name} projected gradients",
        )
        self.shards = [marker["ids"].numpy() for marker in markers]
        self.timing = {"train_features_s": time.perf_counter() - started}
        started = time.perf_counter()
        self._prepare_kernel()
        self.timing["kernel_s"] = time.perf_counter() - started

    def _ids_per_chunk(self) -> int:
        """Examples whose mean gradients (float64) fit in buffer_mb, projected together."""
        per_example = self.num_weights * 8
        return max(1, min(self.shard_size, int(self.buffer_mb * 2**20) // per_example))

    def _shard_features(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        started = time.perf_counter()
        shard = int(ids[0]) // self.shard_size  # ids are 0..N-1 in order
        dataset = self.dataset
        rows = []
        with evaluation_mode(self.model):
            for begin in range(0, len(ids), self._ids_per_chunk()):
                chunk = ids[begin : begin + self._ids_per_chunk()].tolist()
                means = training_gradient_means(
                    self.model,
                    dataset,
                    chunk,
                    self.selected,
                    self.train_output,
                    self.resolved_timesteps,
                    self.caption_indices,
                    self.resolved_flips,
                    seed=self.seed,
                    batch_size=self.batch_size,
                    method=self.gradient_method,
                )
                rows.append(self.projection.project(means).to("cpu", torch.float32))
        features = torch.cat(rows)
        self.features.write(shard, features)
        seconds = time.perf_counter() - started
        log.info(
            "%s shard %d: %d examples in %.1f s (%.2f examples/s)",
            self.name,
            shard,
            len(ids),
            seconds,
            len(ids) / max(seconds, 1e-9),
        )
        return {"ids": torch.as_tensor(ids, dtype=torch.int64)}

    def iter_features(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(ids, Φ rows [len(ids), k] float32), one memory-mapped shard at a time."""
        return self.features.iter_features(self.shards)

    def _kernel_path(self) -> Path:
        key = hash_json(
            [self.kernel_damping, self.train_ids.tolist(), getattr(self, "kernel_form", "features")]
        )
        return self.features.kernel_path(key)

    def _train_rows(self) -> Iterator[torch.Tensor]:
        """Φ's rows of the model's training ids, shard by shard, on the model's device."""
        is_train = np.zeros(len(self.all_ids), dtype=bool)
        is_train[self.train_ids] = True
        for ids, features in self.iter_features():
            yield features[torch.from_numpy(is_train[ids])].to(self.model.device)

    def _prepare_kernel(self) -> None:
        """The Cholesky factor of the smaller of two equal forms: ΦᵀΦ + λI (k x k) when k <= N_train,
        else ΦΦᵀ + λI (N_train x N_train, solved with Woodbury, Φ_train kept in memory). Cached."""
        self.kernel_form = "features" if self.projection_dim <= len(self.train_ids) else "examples"
        self.train_features = None
        if self.kernel_form == "examples":
            self.train_features = torch.cat(list(self._train_rows())).to(torch.float64)
        path = self._kernel_path()
        if path.is_file():
            self.factor = load_file(str(path), device=str(self.model.device))["factor"]
            log.info("Kernel factor (%s form) loaded from %s", self.kernel_form, path)
            return
        if self.kernel_form == "features":
            # On the model's device: ΦᵀΦ at paper scale is 2.5e14 float64 operations.
            self.factor = gram_factor(self._train_rows(), self.projection_dim, self.kernel_damping)
        else:
            self.factor = example_gram_factor(self.train_features, self.kernel_damping)
        # For choosing λ: the mean non-zero eigenvalue of ΦᵀΦ, Σ‖φ‖²/min(N, k), which (unlike
        # mean diag(ΦᵀΦ) = Σ‖φ‖²/k) does not depend on k; README: λ of a few times it worked best.
        squared = sum(float(rows.double().pow(2).sum()) for rows in self._train_rows())
        mean_eigenvalue = squared / min(len(self.train_ids), self.projection_dim)
        log.info(
            "Kernel over %d training examples (%s form): mean eigenvalue of ΦᵀΦ %.3g, damping λ = %.3g (%.3g x)",
            len(self.train_ids),
            self.kernel_form,
            mean_eigenvalue,
            self.kernel_damping,
            self.kernel_damping / mean_eigenvalue if mean_eigenvalue > 0 else float("inf"),
        )
        atomic_save_tensors(path, {"factor": self.factor})

    def kernel_solve(self, vectors: torch.Tensor) -> torch.Tensor:
        """(ΦᵀΦ + λI)⁻¹ v for each row of `vectors` [Q, k] (float64, on the factor's device)."""
        if self.kernel_form == "features":
            return kernel_solve(self.factor, vectors.to(self.factor.device))
        return woodbury_solve(
            self.factor, self.train_features, vectors.to(self.factor.device), self.kernel_damping
        )

    def train_side_bytes(self) -> int:
        if not hasattr(self, "features"):
            return 0
        return self.features.bytes(self._kernel_path())

    # ---------------------------------------------------------------------------------- score
    def query_points(
        self, query: Query, index: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """(noisy inputs [P, C, H, W], timesteps [P], targets [P, ...] or None, record) at which the
        query's output function is differentiated (its mean gradient is φ(q) before projection)."""
        latent = query.latent.to(self.model.device, self.model.unet.dtype)
        steps = self.resolved_timesteps
        noise = torch.stack(
            [keyed_randn(self.model.latent_shape, self.seed, Stream.TRAK_QUERY, t) for t in steps]
        ).to(latent)
        t = torch.tensor(steps, dtype=torch.long, device=latent.device)
        latents = latent[None].expand(len(steps), *latent.shape)
        with torch.no_grad():
            noisy, target = noisy_inputs(self.model, latents, noise, t)
        return noisy, t, target, {"timesteps": steps}

    def query_features(self, queries: Sequence[Query]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Projected query gradients [Q, k] float64 and a record per query. The mean gradients of
        up to buffer_mb worth of queries are projected together (one pass over the projection)."""
        rows: list[torch.Tensor] = []
        records: list[dict[str, Any]] = []
        pending: list[dict[str, torch.Tensor]] = []

        def project_pending() -> None:
            started = time.perf_counter()
            batch = {name: torch.stack([means[name] for means in pending]) for name in self.selected}
            rows.append(self.projection.project(batch))
            share = (time.perf_counter() - started) / len(pending)
            for record in records[-len(pending) :]:
                record["gradient_s"] += share
            pending.clear()

        with evaluation_mode(self.model):
            for k, query in enumerate(queries):
                started = time.perf_counter()
                noisy, t, target, record = self.query_points(query, k)
                mask = None
                if query.mask is not None:
                    mask = mask_to_latent(query.mask, self.model.latent_shape[-2:])[None].to(
                        self.model.device
                    )
                means = point_gradient_means(
                    self.model,
                    self.selected,
                    noisy,
                    t,
                    [query.caption] * len(t),
                    self.query_output,
                    target,
                    mask,
                    batch_size=self.batch_size,
                    method=self.gradient_method,
                )
                pending.append(means)
                norm = math.sqrt(sum(float(v.pow(2).sum()) for v in means.values()))
                records.append({**record, "gradient_norm": norm, "gradient_s": time.perf_counter() - started})
                if len(pending) >= self._ids_per_chunk():
                    project_pending()
            if pending:
                project_pending()
        return torch.cat(rows), records

    def score(self, queries: list[Query]) -> np.ndarray:
        started = time.perf_counter()
        features, records = self.query_features(queries)
        gradient_s = time.perf_counter() - started
        solved = self.kernel_solve(features)  # [Q, k]
        scores = np.zeros((len(queries), len(self.all_ids)), dtype=np.float32)
        for ids, rows in self.iter_features():
            product = solved @ rows.to(solved.device, torch.float64).T
            scores[:, ids] = product.to("cpu", torch.float32).numpy()
        scoring_s = time.perf_counter() - started - gradient_s
        for k, record in enumerate(records):
            # The kernel pass over Φ is shared by the queries: each gets its share of it.
            record["seconds"] = record["gradient_s"] + scoring_s / len(queries)
            self.query_records.append(record)
            log.info("%s query %d: %.2f s (%s)", self.name, k, record["seconds"], record)
        return scores


class DTRAKAttributor(TRAKAttributor):
    """D-TRAK: f = ‖model output‖² (averaged over pixels), for the training examples and the query."""

    name = "dtrak"
    train_output = "output_norm"
    query_output = "output_norm"
    default_damping = 0.01  # conf/method/dtrak.yaml sets the same


class JourneyTRAKAttributor(TRAKAttributor):
    """JourneyTRAK: training side as TRAK; the query differentiated at one step of its own sampling
    trajectory (`query_timestep`, the nearest step the sampler visits)."""

    name = "journeytrak"

    def __init__(self, query_timestep: int = 400, regeneration_atol: float = 1e-3, **settings: Any) -> None:
        super().__init__(**settings)
        self.query_timestep = int_setting("method.query_timestep", query_timestep, minimum=0)
        self.regeneration_atol = float(regeneration_atol)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "query_timestep": self.query_timestep}

    def query_points(
        self, query: Query, index: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        source = query.source
        if "prompt" not in source or "seed" not in source:
            raise QueryError(
                f"Query {index} ({source.get('image', query.caption)!r}) is an image: method=journeytrak needs a "
                "query the model generated (query.prompts=[...] with query.seeds=[...]), because it differentiates "
                "along the query's own sampling trajectory, which an image does not have. Use method=trak or "
                "method=dtrak for image queries."
            )
        num_steps = int(source.get("num_steps", 30))
        sampler = str(source.get("sampler", "ddim"))
        guidance = float(source.get("guidance_scale", 3.0))
        visited = sampler_timesteps(self.model, num_steps, sampler)
        t = min(visited, key=lambda s: (abs(s - self.query_timestep), s))
        samples = generate(
            self.model,
            [str(source["prompt"])],
            [int(source["seed"])],
            num_steps=num_steps,
            guidance_scale=guidance,
            sampler=sampler,
            record_timesteps=[t],
        )
        final = query.latent.to(samples.latents)
        difference = float((samples.latents[0] - final).abs().max())
        if not difference <= self.regeneration_atol:
            raise QueryError(
                f"Query {index} ({source['prompt']!r}, seed {source['seed']}) regenerated with {sampler}, {num_steps} "
                f"steps, guidance {guidance} ends {difference:.3g} away from its saved final latent: it was not "
                "generated by this model with these settings, so its trajectory is unknown. Generate the query "
                "with this checkpoint (attribute.py does), or use method=trak / method=dtrak."
            )
        x_t = samples.trajectory[t]
        alpha_bar = self.model.scheduler.alphas_cumprod[t].to(x_t)
        noise = (x_t - alpha_bar.sqrt() * final[None]) / (1 - alpha_bar).sqrt()
        timesteps = torch.tensor([t], dtype=torch.long, device=x_t.device)
        with torch.no_grad():
            target = self.model.target(final[None], noise, timesteps)
        record = {"trajectory_timestep": t, "regenerated_max_abs_diff": difference}
        return x_t, timesteps, target, record
