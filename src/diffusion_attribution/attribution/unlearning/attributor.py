"""`method=unlearning` (AbU, Wang et al. 2024): unlearn the query with a Fisher-preconditioned
Newton step on a weight subset, then score every training example by how much its loss rose.

prepare: the curvature (method/curvature: the diagonal Fisher, EK-FAC, ...) over the training set and the
before-unlearning loss sweep, both cached under `cache_dir` keyed by (model weights, data, config)
and shared by every query and run.
score: per query, unlearn from θ₀, sweep the training set again (in the run directory: a killed run
resumes), put θ₀ back. Score = loss after − loss before (method.score=log_ratio: log(after / before)),
averaged over captions, max over flips.

method/candidates=features|captions|scores|union (attribution/candidates/; default none): FastGDA's
pruning. Each query gets a shortlist of k examples from a cheap ranker; the before-unlearning sweep
covers the union of all shortlists (or reuses the cached full sweep when it is complete), the
after-unlearning sweep only the query's shortlist; keyed noise makes the shortlisted scores exactly the
unpruned ones. Off-list examples rank below every shortlisted one (see `score`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion_attribution.attribution.base import AttributionContext, Attributor, disk_bytes, mask_unscored
from diffusion_attribution.attribution.candidates import CandidateRanker
from diffusion_attribution.attribution.candidates.base import OPTIONS
from diffusion_attribution.attribution.checks import (
    bool_setting,
    captions_setting,
    check_caption_indices,
    check_timesteps,
    flips_setting,
    float_setting,
    int_setting,
    timesteps_setting,
)
from diffusion_attribution.attribution.queries import Query
from diffusion_attribution.attribution.unlearning.scores import FLIP_REDUCTIONS, SCORES, unlearning_scores
from diffusion_attribution.attribution.unlearning.sensitivity import (
    SensitivitySettings,
    bank_queries,
    correct,
)
from diffusion_attribution.attribution.unlearning.sensitivity import describe as describe_sensitivity
from diffusion_attribution.attribution.unlearning.step import preserved_parameters, unlearn
from diffusion_attribution.compute.input_cache import DTYPES, SweepInputs, cached_inputs, resident_inputs
from diffusion_attribution.compute.sharded import shard_path
from diffusion_attribution.curvature.base import Curvature
from diffusion_attribution.curvature.diagonal import DiagonalCurvature
from diffusion_attribution.curvature.ekfac import EKFACCurvature
from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.models.weight_subsets import (
    SUBSETS,
    count_parameters,
    describe_subsets,
    select_parameters,
)
from diffusion_attribution.objective.loss import mask_to_latent
from diffusion_attribution.objective.sweep import (
    ATTENTION_BACKENDS,
    INPUT_DTYPES,
    NOISES,
    PRECISIONS,
    SweepConfig,
    SweepEngine,
    check_choice,
    run_loss_sweep,
)
from diffusion_attribution.utils.atomic import atomic_save_tensors, load_checked_tensors
from diffusion_attribution.utils.fingerprint import (
    data_fingerprint,
    hash_json,
    model_fingerprint,
    module_fingerprint,
)

log = logging.getLogger(__name__)


class UnlearningAttributor(Attributor):
    name = "unlearning"

    def __init__(
        self,
        curvature: Curvature | None = None,
        params: str = "kv",
        steps: int = 1,
        step_size: float = 0.01,
        target_loss_rise: float | None = None,
        num_samples: int = 64,
        num_train: float | None = None,
        timesteps: Sequence[int] | None = None,
        num_timesteps: int = 10,
        captions: Sequence[int] | str = "all",
        flips: str | Sequence[bool] = "auto",
        flip_reduction: str = "max",
        score: str = "difference",
        batch_size: int = 64,
        shard_size: int = 256,
        chunk_size: int = 64,
        candidates: CandidateRanker | None = None,
        sensitivity: dict[str, Any] | None = None,
        noise: str = "generator",
        precision: str = "fp32",
        compile: bool = False,
        channels_last: bool = False,
        attention: str = "default",
        input_cache: bool = True,
        input_cache_dtype: str = "float32",
    ) -> None:
        super().__init__()
        # Checked here, when the config is read: a bad setting would otherwise surface only in
        # score(), after the curvature and the before-unlearning sweep had been paid for.
        self.curvature = DiagonalCurvature() if curvature is None else curvature
        if not isinstance(self.curvature, Curvature):
            raise ValueError(
                f"method.curvature must be a curvature config (method/curvature=diagonal|ekfac|newton|identity), "
                f"got {type(self.curvature).__name__}."
            )
        if params not in SUBSETS:
            raise ValueError(f"Unknown method.params={params!r}. Options: {describe_subsets()}.")
        if isinstance(self.curvature, EKFACCurvature) and params == "all":
            raise ValueError(
                "method/curvature=ekfac covers Linear layers only, and method.params=all includes convolutions "
                "and norms. Use method.params=kv, cross_attn or attn with ekfac, or method/curvature=diagonal."
            )
        if target_loss_rise is not None:
            target_loss_rise = float_setting(
                "method.target_loss_rise",
                target_loss_rise,
                "a positive fraction (1.0: the query loss doubles)",
                "; null keeps the fixed method.step_size.",
            )
        if flip_reduction not in FLIP_REDUCTIONS:
            raise ValueError(f"Unknown method.flip_reduction={flip_reduction!r}; options: {FLIP_REDUCTIONS}.")
        if score not in SCORES:
            raise ValueError(f"Unknown method.score={score!r}; options: {SCORES}.")
        self.params = params
        # Results tables group runs by this name: the curvature is part of what the method is (AbU+
        # next to AbU in one evaluation); the paper's diagonal Fisher keeps the plain name.
        name = self.curvature.name
        self.name = "unlearning" if name == DiagonalCurvature.name else f"unlearning:{name}"
        self.steps = int_setting("method.steps", steps)
        self.step_size = float_setting("method.step_size", step_size)
        self.target_loss_rise = target_loss_rise
        self.num_samples = int_setting("method.num_samples", num_samples)
        self.num_train = None if num_train is None else float_setting("method.num_train", num_train)
        self.timesteps = timesteps_setting("method.timesteps", timesteps)
        self.num_timesteps = int_setting("method.num_timesteps", num_timesteps)
        # Plain values (Hydra passes lists as ListConfig), as ranking.json records them.
        self.captions = captions_setting("method.captions", captions)
        self.flips = flips_setting("method.flips", flips)
        self.flip_reduction = flip_reduction
        self.score_kind = score
        self.batch_size = int_setting("method.batch_size", batch_size)
        self.shard_size = int_setting("method.shard_size", shard_size)
        self.chunk_size = int_setting("method.chunk_size", chunk_size)
        self.candidates = candidates  # method/candidates: None or `none` = every example
        self.sensitivity = SensitivitySettings(
            **dict(sensitivity or {})
        )  # method.sensitivity (sensitivity.py)
        # The sweeps' noise and precision (part of their cache keys) and engine (not: float rounding only).
        self.noise = check_choice("method.noise", noise, NOISES)
        self.precision = check_choice("method.precision", precision, PRECISIONS)
        self.engine = SweepEngine(
            compile=bool_setting("method.compile", compile),
            channels_last=bool_setting("method.channels_last", channels_last),
            attention=check_choice("method.attention", attention, tuple(ATTENTION_BACKENDS)),
        )
        self.input_cache = bool_setting("method.input_cache", input_cache)
        self.input_cache_dtype = check_choice("method.input_cache_dtype", input_cache_dtype, INPUT_DTYPES)
        if not self.input_cache and self.input_cache_dtype != "float32":
            raise ValueError(
                f"method.input_cache_dtype={self.input_cache_dtype} needs method.input_cache=true (without the "
                "cache the inputs are encoded in float32 in every sweep)."
            )
        self.inputs: SweepInputs | None = None

    # ------------------------------------------------------------------------------- prepare
    def prepare(
        self, model: TextToImageModel, datamodule: CaptionedImageDataModule, context: AttributionContext
    ) -> None:
        self.model, self.datamodule, self.context = model, datamodule, context
        self.selected = select_parameters(model.unet, self.params)
        log.info(
            "Unlearning %s: %d weights in %d tensors",
            self.params,
            count_parameters(self.selected),
            len(self.selected),
        )
        self.num_examples = datamodule.num_examples
        # The ids the loss sweeps cover: every example, or the run's chosen subset (score_ids); the
        # curvature is fitted over the whole training set either way.
        self.all_ids = (
            np.arange(datamodule.num_examples)
            if context.candidate_ids is None
            else np.asarray(context.candidate_ids, dtype=np.int64)
        )
        self.train_ids = np.asarray(datamodule.train_ids)
        self.sweep_config = self._sweep_config(model, datamodule, context.seed)
        self.identity = {"model": model_fingerprint(model), "data": data_fingerprint(datamodule)}
        dataset = datamodule.full_dataset()
        self.dataset = dataset
        # method/candidates: every check (k against the examples, a scores run's model) before any work.
        self.ranker = self._check_candidates(model, datamodule)
        cache = context.cache_dir
        started = time.perf_counter()
        curvature = self.curvature
        key = hash_json(
            [self.identity, self.params, curvature.settings(), context.seed, self.train_ids.tolist()]
        )
        curvature_path = cache / "curvature" / f"{curvature.settings()['curvature']}-{key}.safetensors"
        if curvature.needs_fit:
            if curvature_path.is_file():
                curvature.load(curvature_path)
                log.info("%s curvature loaded from %s", curvature.name, curvature_path)
            else:
                curvature.fit(
                    model,
                    datamodule.dataset,  # the model's training set (exclusions applied)
                    self.train_ids,
                    self.params,
                    curvature_path.with_suffix(".shards"),
                    self.identity,
                    batch_size=self.batch_size,
                    seed=context.seed,
                    trainer_kwargs=context.trainer_kwargs,
                )
                curvature.save(curvature_path)
            curvature.validate(self.selected)
        self.timing = {"curvature_s": time.perf_counter() - started}
        sweep_key = hash_json(
            [self.identity, self.sweep_config.to_dict()]
            if context.candidate_ids is None  # the full sweep keeps the key it always had
            else [self.identity, self.sweep_config.to_dict(), self.all_ids.tolist()]
        )
        self.full_sweep_dir = cache / "sweeps" / sweep_key
        self.cached_paths = [curvature_path, self.full_sweep_dir]
        if self.input_cache:  # the UNet's inputs of every sweep, computed once per model and data
            self.inputs = cached_inputs(
                model,
                dataset,
                self.all_ids,
                self.sweep_config.flips,
                self.sweep_config.caption_indices,
                cache / "inputs",
                self.identity["data"],
                batch_size=self.batch_size,
                shard_size=self.shard_size,
                trainer_kwargs=context.trainer_kwargs,
                dtype=DTYPES[self.input_cache_dtype],
            )
            self.cached_paths.append(self.inputs.path)
            self.inputs = resident_inputs(self.inputs, model.device)  # on the GPU when it fits
        if self.ranker is not None:
            started = time.perf_counter()
            self.ranker._prepare(model, datamodule, context, self.identity)
            self.timing["candidates_prepare_s"] = time.perf_counter() - started
            self.cached_paths += self.ranker.train_side_paths()
            # The before-unlearning sweep needs the queries' shortlists: score() runs it.
            self.before, self.before_ids = None, None
            return
        started = time.perf_counter()
        self.before = self._sweep_before(self.all_ids, self.full_sweep_dir)
        self.before_ids = self.all_ids
        self.timing["sweep_before_s"] = time.perf_counter() - started

    def _sweep_before(self, ids: np.ndarray, out_dir: Path) -> torch.Tensor:
        return run_loss_sweep(
            self.model,
            self.dataset,
            ids,
            self.sweep_config,
            out_dir,
            self.identity,
            batch_size=self.batch_size,
            shard_size=self.shard_size,
            trainer_kwargs=self.context.trainer_kwargs,
            description="loss sweep before unlearning",
            inputs=self.inputs,
            engine=self.engine,
        )

    def _check_candidates(
        self, model: TextToImageModel, datamodule: CaptionedImageDataModule
    ) -> CandidateRanker | None:
        """The ranker of method/candidates, checked against this run (None: every example is swept)."""
        ranker = self.candidates
        if ranker is None:
            return None
        if not isinstance(ranker, CandidateRanker):
            raise ValueError(
                f"method.candidates must be a candidates config (method/candidates={OPTIONS}), got "
                f"{type(ranker).__name__}."
            )
        if ranker.everything:
            return None
        ranker.check(model, datamodule, self.all_ids, self.identity)
        return ranker

    def _before_for_shortlists(self, union: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """Before-unlearning losses covering `union` (sorted ids): the cached sweep of every scored id
        when it is complete (or when the union is all of them), else a sweep of the union alone, keyed
        by its ids. Keyed noise makes both give the same numbers on every id."""
        if len(union) == len(self.all_ids) or _sweep_complete(self.full_sweep_dir, len(self.all_ids)):
            return self.all_ids, self._sweep_before(self.all_ids, self.full_sweep_dir)
        key = hash_json([self.identity, self.sweep_config.to_dict(), union.tolist()])
        out_dir = self.context.cache_dir / "sweeps" / f"candidates-{key}"
        self.cached_paths.append(out_dir)
        return union, self._sweep_before(union, out_dir)

    def _sweep_config(
        self, model: TextToImageModel, datamodule: CaptionedImageDataModule, seed: int
    ) -> SweepConfig:
        """The sweep's timesteps, caption indices and flips on this model and data; settings the model
        or the data cannot honour (a timestep past the scheduler's, a caption no example has) are refused."""
        timesteps = check_timesteps("method.timesteps", self.timesteps, self.num_timesteps, model)
        caption_indices = check_caption_indices("method.captions", self.captions, datamodule)
        if self.flips == "auto":
            flips = [False, True] if datamodule.random_flip else [False]
        else:
            flips = list(self.flips)
        return SweepConfig(
            tuple(timesteps),
            tuple(caption_indices),
            tuple(flips),
            seed,
            noise=self.noise,
            precision=self.precision,
            inputs=self.input_cache_dtype,
        )

    def check_settings(self, model: TextToImageModel, datamodule: CaptionedImageDataModule) -> None:
        """The settings' checks against the model and the data, before any work (jobs/attribute.py)."""
        self._sweep_config(model, datamodule, 0)

    def config(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "curvature": self.curvature.describe(),
            "steps": self.steps,
            "step_size": self.step_size,
            "target_loss_rise": self.target_loss_rise,
            "num_samples": self.num_samples,
            "num_train": self._num_train(),
            "sweep": self.sweep_config.to_dict() if hasattr(self, "sweep_config") else None,
            "flip_reduction": self.flip_reduction,
            "score": self.score_kind,
            "sensitivity": describe_sensitivity(self.sensitivity) if self.sensitivity.enabled else None,
            # The shortlist's ranker and k (None: every example scored), so result tables tell a pruned
            # run from the full one.
            "candidates": None if getattr(self, "ranker", None) is None else self.ranker.settings(),
        }

    def train_side_bytes(self) -> int:
        return disk_bytes(*getattr(self, "cached_paths", []))

    def _num_train(self) -> float | None:
        if self.num_train is not None:
            return float(self.num_train)
        return float(len(self.train_ids)) if hasattr(self, "train_ids") else None

    # --------------------------------------------------------------------------------- score
    def score(self, queries: list[Query]) -> np.ndarray:
        """Scores [len(queries), num_examples] (`_score`), relative to the sensitivity bank's per-image
        mean (and spread) with method.sensitivity (sensitivity.py; re-masked off a shortlist)."""
        scores = self._score(queries, self.context.run_dir / "sweeps", keep_records=True)
        if not self.sensitivity.enabled:
            return scores
        mean, std = self._sensitivity_bank()
        corrected = correct(scores, mean, std, self.sensitivity.correction)
        for k, ids in enumerate(self._shortlists):
            if len(ids) < self.num_examples:  # off the shortlist (or score_ids): below every scored one
                masked = np.zeros_like(corrected[k])
                masked[ids] = corrected[k, ids]
                corrected[k] = mask_unscored(masked[None], ids)[0]
        return corrected

    def _sensitivity_bank(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-image mean and std of the scores over the bank (cached per model, data and settings)."""
        settings = [
            self.identity,
            self.config(),
            describe_sensitivity(self.sensitivity),
            self.all_ids.tolist(),
        ]
        key = hash_json(settings)
        path = self.context.cache_dir / "sensitivity" / f"{key}.safetensors"
        if path.is_file():
            bank, _ = load_checked_tensors(path, "delete it so that the bank is recomputed")
            log.info("Sensitivity bank loaded from %s", path)
            return bank["mean"].numpy(), bank["std"].numpy()
        started = time.perf_counter()
        queries = bank_queries(self.model, self.datamodule, self.sensitivity)
        ranker, self.ranker = self.ranker, None  # the bank covers every example
        try:
            raw = self._score(queries, path.with_suffix(".sweeps"), keep_records=False)
        finally:
            self.ranker = ranker
        columns = raw[:, self.all_ids]
        mean, std = np.zeros(self.num_examples, np.float32), np.ones(self.num_examples, np.float32)
        mean[self.all_ids] = columns.mean(0)
        if len(queries) > 1:
            std[self.all_ids] = columns.std(0, ddof=1)
        atomic_save_tensors(path, {"mean": torch.from_numpy(mean), "std": torch.from_numpy(std)})
        self.timing["sensitivity_bank_s"] = time.perf_counter() - started
        log.info(
            "Sensitivity bank of %d images in %.1f s: %s",
            len(queries),
            self.timing["sensitivity_bank_s"],
            path,
        )
        return mean, std

    def _score(self, queries: list[Query], sweep_root: Path, keep_records: bool) -> np.ndarray:
        """Scores [len(queries), num_examples]. Without candidates, columns outside self.all_ids (a
        chosen subset) stay 0 here and the job masks them (mask_unscored). With method/candidates, each
        query's after-unlearning sweep covers its shortlist only, and every column off the shortlist
        gets, per query, the lowest shortlisted score minus max(1, |lowest|) (`mask_unscored`'s value:
        finite, strictly below every shortlisted score, also in float32); the job then puts columns
        outside score_ids lower still."""
        scores = np.zeros((len(queries), self.num_examples), dtype=np.float32)
        device = self.model.device
        pruned = self.ranker is not None
        if pruned:
            started = time.perf_counter()
            shortlists = self.ranker.shortlists(queries)
            ranking_s = time.perf_counter() - started
            started = time.perf_counter()
            self.before_ids, self.before = self._before_for_shortlists(np.unique(np.concatenate(shortlists)))
            self.timing["sweep_before_s"] = time.perf_counter() - started
            candidate_info = {
                "ranker": self.ranker.settings(),
                "ranking_s": ranking_s,
                "sweep_before_s": self.timing["sweep_before_s"],
                "num_swept_before": len(self.before_ids),
            }
        else:
            shortlists = [self.all_ids] * len(queries)
        self._shortlists = shortlists
        for k, query in enumerate(queries):
            started = time.perf_counter()
            ids = shortlists[k]
            before = self.before if not pruned else self.before[np.searchsorted(self.before_ids, ids)]
            with preserved_parameters(self.selected):
                record = unlearn(
                    self.model,
                    query.latent[None].to(device),
                    query.caption,
                    self.curvature,
                    self.selected,
                    steps=self.steps,
                    step_size=self.step_size,
                    target_loss_rise=self.target_loss_rise,
                    num_samples=self.num_samples,
                    num_train=self._num_train(),
                    seed=self.context.seed,
                    # masks come at image resolution; latent models unlearn at latent resolution
                    mask=None
                    if query.mask is None
                    else mask_to_latent(query.mask, self.model.latent_shape[-2:]),
                    chunk_size=self.chunk_size,
                )
                unlearned = module_fingerprint(self.model.unet)
                sweep_started = time.perf_counter()
                after = run_loss_sweep(
                    self.model,
                    self.dataset,
                    ids,
                    self.sweep_config,
                    sweep_root / f"query_{k:03d}",
                    {**self.identity, "unlearned": unlearned, "query": query.caption},
                    batch_size=self.batch_size,
                    shard_size=self.shard_size,
                    trainer_kwargs=self.context.trainer_kwargs,
                    description=f"loss sweep after unlearning query {k}",
                    inputs=self.inputs,
                    engine=self.engine,
                )
                sweep_after_s = time.perf_counter() - sweep_started
            # The loss difference (the paper's score) also feeds the diagnostics, whatever method.score is.
            loss_change = unlearning_scores(before, after, self.flip_reduction)
            query_scores = (
                loss_change
                if self.score_kind == "difference"
                else unlearning_scores(before, after, self.flip_reduction, self.score_kind)
            )
            if not torch.isfinite(query_scores).all():
                raise FloatingPointError(
                    f"Query {k}: non-finite scores after unlearning (loss before {record.loss_before}, after "
                    f"{record.loss_after}). Lower method.step_size (or method.target_loss_rise) or raise method.curvature.damping."
                )
            scores[k, ids] = query_scores.numpy()
            if pruned:  # off the shortlist: below every shortlisted score (see the docstring)
                scores[k] = mask_unscored(scores[k : k + 1], ids)[0]
            delta = (after - before).nanmean(dim=1).mean(dim=-1)
            if not keep_records:
                continue
            self.query_records.append(
                {
                    **record.as_dict(),
                    "query_loss_increase": None
                    if record.loss_after is None
                    else float(record.loss_after - record.loss_before),
                    "mean_train_loss_change": float(delta.mean()),  # over the swept (shortlisted) ids
                    "top10_train_loss_change": float(  # of the 10 top-scored examples
                        loss_change[torch.topk(query_scores, min(10, len(query_scores))).indices].mean()
                    ),
                    "sweep_after_s": sweep_after_s,
                    **(
                        {"candidates": {**candidate_info, **self._shortlist_record(k, query, ids)}}
                        if pruned
                        else {}
                    ),
                    "seconds": time.perf_counter() - started,
                }
            )
            log.info(
                "Query %d: query loss %.4f -> %.4f (step size %s); mean training loss change %.2e "
                "(retention) over %d examples; %.1f s",
                k,
                record.loss_before,
                record.loss_after if record.loss_after is not None else float("nan"),
                ", ".join(f"{a:.3g}" for a in record.step_sizes),
                float(delta.mean()),
                len(ids),
                time.perf_counter() - started,
            )
        return scores

    def _shortlist_record(self, k: int, query: Query, ids: np.ndarray) -> dict[str, Any]:
        """ranking.json's account of a query's shortlist: its size, its ids (inline when short, else
        saved as run_dir/candidates/query_<k>.npy) and, with relevant_ids, the share of them it holds."""
        out: dict[str, Any] = {"count": len(ids)}
        if len(ids) <= MAX_INLINE_IDS:
            out["ids"] = ids.tolist()
        else:
            path = self.context.run_dir / "candidates" / f"query_{k:03d}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, ids.astype(np.int64))
            out["ids_file"] = str(path)
        relevant = query.source.get("relevant_ids")
        if relevant is not None and len(relevant) > 0:
            relevant_ids = np.unique(np.asarray(list(relevant), dtype=np.int64))
            found = np.isin(relevant_ids, ids)
            out["recall"] = {
                "relevant": len(relevant_ids),
                "in_shortlist": int(found.sum()),
                "fraction": float(found.mean()),
            }
            members = getattr(self.ranker, "member_shortlists", None)
            if members:  # a union: each member's own share
                out["recall"]["members"] = {
                    name: float(np.isin(relevant_ids, lists[k]).mean()) for name, lists in members.items()
                }
        return out


MAX_INLINE_IDS = 100  # shortlists up to this long are listed in ranking.json; longer ones saved as .npy


def _sweep_complete(out_dir: Path, num_ids: int) -> bool:
    """Whether `out_dir` holds a finished sweep of `num_ids` ids (every shard file present)."""
    meta_path = out_dir / "sweep.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
        size = int(meta["shard_size"])
        if int(meta["num_ids"]) != num_ids:
            return False
    except (ValueError, KeyError, TypeError):
        return False
    return all(shard_path(out_dir, s).is_file() for s in range((num_ids + size - 1) // size))
