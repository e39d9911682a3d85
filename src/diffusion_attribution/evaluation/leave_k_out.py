"""`evaluate.py benchmark=leave_k_out scores='[<attribute run>, ...]' benchmark.k='[...]'`: the
counterfactual test of attributions (PAPER.md, Evaluation). For every query, method and K, retrain the
model from scratch without the method's top-K training images (same recipe and seed, as Hydra jobs:
evaluation/retraining.py) and measure how much the retrained model lost the query:

- ΔL = L(ẑ, θ₋K) − L(ẑ, θ₀), the query's diffusion loss on a fine timestep grid (stride 5 of 1000)
  with noise fixed per (seed, query, timestep): identical for both models, so ΔL(θ₀, θ₀) = 0 exactly;
- ΔG: the query's prompt generated with the same seed and sampler by both models: pixel MSE (images in
  [0, 1]) and, with `benchmark.clip_path`, the CLIP image cosine similarity; on the embedded world also
  whether the attribute reader still sees the query's rare concept in the retrained model's image;
- retention: ΔL and ΔG of unrelated prompts (the retrained model should still draw them as before).

The random-removal baseline removes K ids drawn at random, `random_draws` sets per K. A random set
does not depend on the query, so each set is retrained once and evaluated on every query (per query,
the draws are averaged before the mean over queries). Results are means ± standard errors over
queries, per method and K: results.csv (one row per query × method × K × draw), leave_k_out.md (a
Table-1-style table), metrics.json, delta_loss_vs_k.png, before_after.png (and W&B tables/images with
logger=wandb). `benchmark.dry_run=true` writes and prints the retrain plan with its estimated compute
and stops.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.evaluation.retraining import RetrainJob, RetrainPlan, random_exclusion
from diffusion_attribution.evaluation.retrieval import concept_index
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.models.sampling import generate
from diffusion_attribution.objective.loss import encode_captions, evaluation_mode, squared_error
from diffusion_attribution.utils.fingerprint import hash_json
from diffusion_attribution.utils.images import titled_grid
from diffusion_attribution.utils.seeding import keyed_randn

logger = logging.getLogger(__name__)

log = logging.getLogger(__name__)

QUERY_NOISE_STREAM = 301  # key prefix of the fixed ΔL noise (never shared with training draws)
LEAVE_K_OUT_RANDOM = 1  # random_exclusion keys: (1, K, draw) here, (2, subset) in LDS
RANDOM_BASELINE = "random"


class LeaveKOutError(ValueError):
    """Inputs the benchmark cannot evaluate; the message says how to fix them."""


# ---------------------------------------------------------------------------------------- inputs
@dataclass
class AttributionRun:
    """One attribute.py run directory: its scores, query records and the model it attributed."""

    path: Path
    method: str
    scores: np.ndarray  # [num_queries, num_train]
    ranking: dict[str, Any]

    @property
    def queries(self) -> list[dict[str, Any]]:
        return self.ranking["queries"]


def query_identity(record: dict[str, Any]) -> dict[str, Any]:
    """What makes two query records the same query (prompt + seed + sampler, or image + caption)."""
    keys = ("prompt", "seed", "sampler", "num_steps", "guidance_scale", "image", "caption", "box", "mask")
    return {k: record.get(k) for k in keys if record.get(k) is not None}


def load_attribution_runs(paths: Sequence[str | Path] | str | None) -> list[AttributionRun]:
    """Read every scores= run; they must attribute the same queries of the same model."""
    if paths is None or (isinstance(paths, str) and not paths.strip()):
        raise LeaveKOutError(
            "Give the attribution runs to evaluate: scores='[<attribute.py run dir>, ...]' (one per method, "
            "same model and queries)."
        )
    if isinstance(paths, (str, Path)):
        paths = [paths]
    runs: list[AttributionRun] = []
    for entry in paths:
        path = Path(entry)
        for name in ("scores.npy", "ranking.json"):
            if not (path / name).is_file():
                raise LeaveKOutError(
                    f"{path / name} not found: every scores= entry must be a run directory written by attribute.py."
                )
        ranking = json.loads((path / "ranking.json").read_text())
        scores = np.load(path / "scores.npy")
        if scores.shape[0] != len(ranking["queries"]):
            raise LeaveKOutError(
                f"{path}: scores.npy has {scores.shape[0]} rows for {len(ranking['queries'])} queries."
            )
        runs.append(AttributionRun(path, str(ranking.get("method", path.name)), scores, ranking))
    first = runs[0]
    for run in runs[1:]:
        if Path(str(run.ranking.get("model"))).resolve() != Path(str(first.ranking.get("model"))).resolve():
            raise LeaveKOutError(
                f"{run.path} attributed model {run.ranking.get('model')} but {first.path} attributed "
                f"{first.ranking.get('model')}: leave-K-out retrains one base model; evaluate runs of one model together."
            )
        if [query_identity(q) for q in run.queries] != [query_identity(q) for q in first.queries]:
            raise LeaveKOutError(
                f"{run.path} and {first.path} attribute different queries: run attribute.py with the same "
                "query.prompts/query.seeds (or query.file) for every method, so that methods are compared on "
                "the same queries."
            )
        if run.scores.shape != first.scores.shape:
            raise LeaveKOutError(
                f"{run.path} scores {run.scores.shape} but {first.path} scores {first.scores.shape}."
            )
    # Distinct names: a second run of a method (other settings) is told apart by its folder name;
    # a per-query random *ranking* is not the built-in random-removal baseline.
    seen: dict[str, int] = {}
    for run in runs:
        if run.method == RANDOM_BASELINE:
            run.method = "random_ranking"
        seen[run.method] = seen.get(run.method, 0) + 1
        if seen[run.method] > 1:
            run.method = f"{run.method}@{run.path.name}"
    return runs


@dataclass
class EvalQuery:
    index: int
    caption: str
    latent: torch.Tensor  # what the query's loss is measured on (the sampler's final latent)
    image: torch.Tensor
    noise_key: int
    prompt: str | None = None
    seed: int | None = None
    sampler: dict[str, Any] = field(default_factory=dict)
    concept: str | None = None
    relevant: np.ndarray | None = None


def noise_key(identity: dict[str, Any]) -> int:
    return int(hash_json(identity), 16)


def query_concept(record: dict[str, Any], concepts: dict[str, np.ndarray]) -> str | None:
    if record.get("concept"):
        return str(record["concept"])
    words = set(re.findall(r"[a-z0-9]+", str(record.get("caption") or record.get("prompt") or "").lower()))
    named = [c for c in concepts if c.lower() in words]
    return named[0] if len(named) == 1 else None


def load_queries(run: AttributionRun, concepts: dict[str, np.ndarray]) -> list[EvalQuery]:
    """The queries of an attribution run with the latents attribute.py saved (queries/query_XXX)."""
    queries = []
    for k, record in enumerate(run.queries):
        path = run.path / "queries" / f"query_{k:03d}.safetensors"
        if not path.is_file():
            raise LeaveKOutError(f"{path} not found: attribute.py saves every query's latent there.")
        tensors = load_file(path)
        concept = query_concept(record, concepts)
        relevant = record.get("relevant_ids")
        queries.append(
            EvalQuery(
                index=k,
                caption=str(record.get("caption") or record.get("prompt")),
                latent=tensors["latent"],
                image=tensors["image"],
                noise_key=noise_key(query_identity(record)),
                prompt=record.get("prompt"),
                seed=None if record.get("seed") is None else int(record["seed"]),
                sampler={
                    "num_steps": int(record.get("num_steps", 30)),
                    "guidance_scale": float(record.get("guidance_scale", 3.0)),
                    "sampler": str(record.get("sampler", "ddim")),
                },
                concept=concept,
                relevant=np.asarray(relevant, dtype=np.int64)
                if relevant is not None
                else concepts.get(concept)
                if concept
                else None,
            )
        )
    return queries


# ---------------------------------------------------------------------------------------- metrics
def loss_timesteps(model: TextToImageModel, stride: int = 5) -> list[int]:
    """The fine grid of ΔL: every `stride`-th training timestep (the paper: stride 5 of 1000)."""
    if stride < 1:
        raise LeaveKOutError(f"benchmark.timestep_stride must be at least 1, got {stride}.")
    return list(range(0, int(model.scheduler.config.num_train_timesteps), stride))


@torch.no_grad()
def fixed_noise_loss(
    model: TextToImageModel,
    latent: torch.Tensor,
    caption: str,
    key: int,
    timesteps: Sequence[int],
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """L(ẑ, θ): the noise-prediction loss of one latent, averaged over pixels and `timesteps`, with the
    noise of timestep t keyed by (seed, key, t). Same batches for every model: the same model gives
    exactly the same number."""
    device = model.device
    total = 0.0
    with evaluation_mode(model):
        text = encode_captions(model, [caption])
        for start in range(0, len(timesteps), batch_size):
            steps = list(timesteps[start : start + batch_size])
            noise = torch.stack(
                [keyed_randn(model.latent_shape, seed, QUERY_NOISE_STREAM, key, t) for t in steps]
            )
            noise = noise.to(device, model.unet.dtype)
            latents = latent[None].to(device, model.unet.dtype).expand(len(steps), *latent.shape)
            t = torch.tensor(steps, dtype=torch.long, device=device)
            pred = model.predict(
                model.add_noise(latents, noise, t), t, text.expand(len(steps), *text.shape[1:])
            )
            total += float(squared_error(pred, model.target(latents, noise, t)).double().sum())
    return total / len(timesteps)


def generate_one(model: TextToImageModel, prompt: str, seed: int, sampler: dict[str, Any]) -> torch.Tensor:
    """One image [3, H, W] in [-1, 1] (one at a time: identical batching for every model)."""
    return generate(model, [prompt], [seed], **sampler).images[0].cpu()


def pixel_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared pixel difference of two images in [-1, 1], measured on the [0, 1] scale."""
    return float(((a.double() - b.double()) / 2).pow(2).mean())


class ImageJudges:
    """Optional readers of generated images: CLIP image features (cosine similarity) and, on the
    embedded world, the attribute reader's concept."""

    def __init__(
        self, clip_path: str | None, datamodule: CaptionedImageDataModule, reader_cache_dir: str
    ) -> None:
        self.clip = None
        if clip_path:
            from diffusion_attribution.models.backbones import load_backbone

            self.clip = load_backbone("clip", clip_path)
        self.reader = None
        from diffusion_attribution.data.shapes import ShapesDataModule

        if isinstance(datamodule, ShapesDataModule):
            from diffusion_attribution.evaluation.attribute_reader import load_or_train_reader

            self.reader, _ = load_or_train_reader(datamodule.world, reader_cache_dir)

    def clip_similarity(self, a: torch.Tensor, b: torch.Tensor) -> float:
        if self.clip is None:
            return math.nan
        features = self.clip.image_features(torch.stack([a, b]).to(self.clip.device))
        return float(torch.nn.functional.cosine_similarity(features[0], features[1], dim=0))

    def concept(self, image: torch.Tensor) -> str | None:
        if self.reader is None:
            return None
        return self.reader.read(image[None])[0]["concept"]


@dataclass
class Reference:
    """What θ₀ gives for a query or retention prompt (computed once)."""

    loss: float
    image: torch.Tensor | None
    concept: str | None = None


@dataclass
class RetentionPrompt:
    prompt: str
    seed: int
    latent: torch.Tensor
    key: int


def model_metrics(
    model: TextToImageModel,
    latent: torch.Tensor,
    caption: str,
    key: int,
    prompt: str | None,
    seed: int | None,
    sampler: dict[str, Any],
    reference: Reference,
    judges: ImageJudges,
    timesteps: Sequence[int],
    loss_seed: int,
    batch_size: int,
) -> tuple[dict[str, float], torch.Tensor | None]:
    """ΔL, ΔG MSE, ΔG CLIP and the concept read in the new image, against θ₀'s `reference`."""
    loss = fixed_noise_loss(model, latent, caption, key, timesteps, loss_seed, batch_size)
    out: dict[str, Any] = {"loss_retrained": loss, "delta_loss": loss - reference.loss}
    image = None
    if prompt is not None and seed is not None and reference.image is not None:
        image = generate_one(model, prompt, seed, sampler)
        out["dg_mse"] = pixel_mse(image, reference.image)
        out["dg_clip"] = judges.clip_similarity(image, reference.image)
        out["concept_read"] = judges.concept(image)
    else:
        out.update(dg_mse=math.nan, dg_clip=math.nan, concept_read=None)
    return out, image


# ---------------------------------------------------------------------------------------- planning
def plan_leave_k_out(
    runs: Sequence[AttributionRun],
    plan: RetrainPlan,
    ks: Sequence[int],
    random_draws: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Request every (query, method, K) retrain and the random-removal sets; return the evaluation
    list: one entry per (query or all queries, method, K, draw) with its RetrainJob."""
    num_train = runs[0].scores.shape[1]
    entries: list[dict[str, Any]] = []
    for k in ks:
        if not 0 < k < num_train:
            raise LeaveKOutError(f"benchmark.k has {k}: each K must be between 1 and {num_train - 1}.")
        for run in runs:
            for q in range(run.scores.shape[0]):
                top = np.argsort(-run.scores[q], kind="stable")[:k]
                job = plan.request(top, query=q, method=run.method, k=k)
                entries.append(
                    {"query": q, "method": run.method, "k": k, "draw": 0, "job": job, "removed": top}
                )
        for draw in range(random_draws):
            ids = random_exclusion(num_train, k, seed, LEAVE_K_OUT_RANDOM, k, draw)
            job = plan.request(ids, method=RANDOM_BASELINE, k=k, draw=draw)
            entries.append(
                {"query": None, "method": RANDOM_BASELINE, "k": k, "draw": draw, "job": job, "removed": ids}
            )
    return entries


# ---------------------------------------------------------------------------------------- summary
def mean_and_sem(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if len(array) == 0:
        return math.nan, math.nan
    sem = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else 0.0
    return float(array.mean()), sem


def summarise(rows: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, dict[int, dict[str, Any]]]:
    """method -> K -> metric -> (mean, sem, n): draws averaged per query first, then over queries."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        out[method] = {}
        for k in sorted({r["k"] for r in rows if r["method"] == method}):
            chosen = [r for r in rows if r["method"] == method and r["k"] == k]
            stats: dict[str, Any] = {}
            for metric in metrics:
                per_query: dict[int, list[float]] = {}
                for r in chosen:
                    value = r.get(metric)
                    if value is None or (isinstance(value, float) and math.isnan(value)):
                        continue
                    per_query.setdefault(r["query"], []).append(float(value))
                values = [float(np.mean(v)) for v in per_query.values()]
                mean, sem = mean_and_sem(values)
                stats[metric] = {"mean": mean, "sem": sem, "n": len(values)}
            out[method][k] = stats
    return out


TABLE_METRICS = (  # column, scale, label (the paper's units), better
    ("delta_loss", 1e-3, "ΔL ×1e-3 (↑)"),
    ("dg_mse", 1e-2, "ΔG MSE ×1e-2 (↑)"),
    ("dg_clip", 1e-1, "ΔG CLIP ×1e-1 (↓)"),
    ("concept_kept", 1.0, "concept still drawn (↓)"),
    ("retention_delta_loss", 1e-3, "retention ΔL ×1e-3 (≈0)"),
    ("retention_dg_mse", 1e-2, "retention ΔG MSE ×1e-2 (≈0)"),
)


def markdown_table(summary: dict[str, dict[int, dict[str, Any]]], ks: Sequence[int]) -> str:
    """Methods × K for each metric, mean ± s.e. over queries (Table 1 of the paper, plus extras)."""
    lines = []
    for metric, scale, label in TABLE_METRICS:
        cells = {
            (m, k): summary[m].get(k, {}).get(metric, {"mean": math.nan, "sem": math.nan, "n": 0})
            for m in summary
            for k in ks
        }
        if all(math.isnan(c["mean"]) for c in cells.values()):
            lines += [
                f"**{label}**: not measured" + (" (set benchmark.clip_path)" if metric == "dg_clip" else ""),
                "",
            ]
            continue
        lines += [f"**{label}**", "", "| method | " + " | ".join(f"K={k}" for k in ks) + " |"]
        lines.append("|---|" + "---|" * len(ks))
        for m in summary:
            row = []
            for k in ks:
                c = cells[(m, k)]
                row.append(
                    "–" if math.isnan(c["mean"]) else f"{c['mean'] / scale:.2f} ± {c['sem'] / scale:.2f}"
                )
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def ratio_lines(summary: dict[str, dict[int, dict[str, Any]]], ks: Sequence[int]) -> list[str]:
    """Each method's ΔL as a multiple of the random-removal baseline's, per K."""
    if RANDOM_BASELINE not in summary:
        return []
    lines = []
    for k in ks:
        base = summary[RANDOM_BASELINE].get(k, {}).get("delta_loss", {}).get("mean", math.nan)
        parts = [
            f"{m} {summary[m][k]['delta_loss']['mean'] / base:.2f}×"
            for m in summary
            if m != RANDOM_BASELINE and k in summary[m] and base and not math.isnan(base)
        ]
        lines.append(f"- K={k}: ΔL relative to random: " + ", ".join(parts))
    return lines


def plot_delta_loss(
    summary: dict[str, dict[int, dict[str, Any]]], path: Path, metric: str = "delta_loss"
) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, per_k in summary.items():
        ks = sorted(per_k)
        means = [per_k[k][metric]["mean"] for k in ks]
        sems = [per_k[k][metric]["sem"] for k in ks]
        ax.errorbar(ks, means, yerr=sems, marker="o", capsize=3, label=method)
    ax.set_xlabel("K (training images removed)")
    ax.set_ylabel("ΔL = L(ẑ, θ₋K) − L(ẑ, θ₀)")
    ax.set_title("Leave-K-out: loss increase on the query (mean ± s.e.)", fontsize=9)
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------- benchmark
def run_leave_k_out_benchmark(
    cfg: DictConfig,
    run_dir: str | Path,
    scores: Sequence[str] | str | None = None,
    k: Sequence[int] = (10, 20),
    random_draws: int = 3,
    seed: int = 0,
    retrain_dir: str = ".cache/retrains",
    retrain_overrides: Sequence[str] = (),
    num_threads: int | None = None,
    launch_batch_size: int | None = None,
    dry_run: bool = False,
    seconds_per_step: float | None = None,
    timestep_stride: int = 5,
    loss_batch_size: int = 256,
    clip_path: str | None = None,
    reader_cache_dir: str = ".cache/data",
    retention_prompts: Sequence[str] = (),
    retention_seeds: Sequence[int] | None = None,
    example_queries: int = 4,
) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ks = sorted({int(v) for v in (k if isinstance(k, Sequence) and not isinstance(k, str) else [k])})
    runs = load_attribution_runs(scores)
    base_checkpoint = Path(str(runs[0].ranking.get("model")))
    num_train = runs[0].scores.shape[1]
    plan = RetrainPlan(base_checkpoint, num_train, retrain_dir, retrain_overrides, num_threads)
    entries = plan_leave_k_out(runs, plan, ks, random_draws, seed)
    listing = plan.describe(seconds_per_step)
    (run_dir / "plan.md").write_text(listing)
    (run_dir / "plan.json").write_text(
        json.dumps({"summary": plan.summary(seconds_per_step), "jobs": plan.rows(seconds_per_step)}, indent=2)
    )
    print(listing)
    if dry_run:
        log.info("Dry run: %d retrains planned (plan.md); nothing trained.", len(plan.jobs))
        return plan.summary(seconds_per_step)
    plan.launch(current_launcher(), launch_batch_size)
    return evaluate_leave_k_out(
        cfg, run_dir, runs, plan, entries, ks, timestep_stride, loss_batch_size, clip_path,
        reader_cache_dir, list(retention_prompts), retention_seeds, example_queries,
    )  # fmt: skip


def current_launcher() -> DictConfig | None:
    """The `hydra.launcher` node of the running evaluate.py job (None outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().launcher


def base_datamodule(plan: RetrainPlan) -> CaptionedImageDataModule:
    """The base model's own training data (its recorded config, exclusions dropped): ids match."""
    data_cfg = OmegaConf.masked_copy(plan.base_config, ["data"]).data
    data_cfg.exclude = None
    return hydra.utils.instantiate(data_cfg)


def load_model(path: str | Path) -> TextToImageModel:
    model = TextToImageModel.from_pretrained(path)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def evaluate_leave_k_out(
    cfg: DictConfig,
    run_dir: Path,
    runs: Sequence[AttributionRun],
    plan: RetrainPlan,
    entries: list[dict[str, Any]],
    ks: Sequence[int],
    timestep_stride: int,
    loss_batch_size: int,
    clip_path: str | None,
    reader_cache_dir: str,
    retention_prompts: list[str],
    retention_seeds: Sequence[int] | None,
    example_queries: int,
) -> dict[str, Any]:
    datamodule = base_datamodule(plan)
    if datamodule.num_examples != runs[0].scores.shape[1]:
        raise LeaveKOutError(
            f"The scores have {runs[0].scores.shape[1]} columns but the model's training data has "
            f"{datamodule.num_examples} examples."
        )
    concepts = concept_index(datamodule)
    queries = load_queries(runs[0], concepts)
    judges = ImageJudges(clip_path, datamodule, reader_cache_dir)
    loss_seed = int(cfg.get("seed", 0))
    base = load_model(plan.base_checkpoint)
    timesteps = loss_timesteps(base, timestep_stride)
    query_refs = {}
    for q in queries:
        image = (
            generate_one(base, q.prompt, q.seed, q.sampler)
            if q.prompt is not None and q.seed is not None
            else None
        )
        loss = fixed_noise_loss(base, q.latent, q.caption, q.noise_key, timesteps, loss_seed, loss_batch_size)
        query_refs[q.index] = Reference(loss, image, judges.concept(image) if image is not None else None)
    seeds = list(retention_seeds) if retention_seeds is not None else list(range(len(retention_prompts)))
    if len(seeds) != len(retention_prompts):
        raise LeaveKOutError("benchmark.retention_seeds needs one seed per retention prompt (or null).")
    retention: list[RetentionPrompt] = []
    retention_refs: list[Reference] = []
    sampler = queries[0].sampler if queries else {}
    for prompt, s in zip(retention_prompts, seeds, strict=True):
        samples = generate(base, [prompt], [int(s)], **sampler)
        item = RetentionPrompt(
            prompt, int(s), samples.latents[0].cpu(), noise_key({"retention": prompt, "seed": int(s)})
        )
        retention.append(item)
        loss = fixed_noise_loss(base, item.latent, prompt, item.key, timesteps, loss_seed, loss_batch_size)
        retention_refs.append(Reference(loss, samples.images[0].cpu()))
    del base

    # One pass per retrained model: the queries that asked for it (all queries for a random set).
    by_job: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_job.setdefault(entry["job"].key, []).append(entry)
    rows: list[dict[str, Any]] = []
    images: dict[tuple[int, str, int], torch.Tensor] = {}
    for n, (key, job_entries) in enumerate(by_job.items()):
        job: RetrainJob = job_entries[0]["job"]
        model = load_model(job.checkpoint)
        log.info("Evaluating retrain %d/%d (%s)", n + 1, len(by_job), key)
        kept = {}
        for item, ref in zip(retention, retention_refs, strict=True):
            metrics, _ = model_metrics(
                model, item.latent, item.prompt, item.key, item.prompt, item.seed, sampler, ref, judges,
                timesteps, loss_seed, loss_batch_size,
            )  # fmt: skip
            for name in ("delta_loss", "dg_mse", "dg_clip"):
                kept.setdefault(name, []).append(metrics[name])
        retention_stats = {
            # dg_clip is NaN for every prompt without benchmark.clip_path: no mean-of-empty warning.
            f"retention_{name}": float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
            for name, v in kept.items()
        }
        for entry in job_entries:
            targets = queries if entry["query"] is None else [queries[entry["query"]]]
            removed = set(np.asarray(entry["removed"]).tolist())
            for q in targets:
                ref = query_refs[q.index]
                metrics, image = model_metrics(
                    model, q.latent, q.caption, q.noise_key, q.prompt, q.seed, q.sampler, ref, judges,
                    timesteps, loss_seed, loss_batch_size,
                )  # fmt: skip
                if image is not None and entry["draw"] == 0:
                    images[(q.index, entry["method"], entry["k"])] = image
                relevant = q.relevant if q.relevant is not None else np.zeros(0, dtype=np.int64)
                rows.append(
                    {
                        "query": q.index,
                        "caption": q.caption,
                        "concept": q.concept,
                        "method": entry["method"],
                        "k": entry["k"],
                        "draw": entry["draw"],
                        "exclusion": key,
                        "num_excluded": len(job.ids),
                        "relevant_removed": int(sum(int(i) in removed for i in relevant)),
                        "num_relevant": len(relevant),
                        "loss_base": ref.loss,
                        **{k: v for k, v in metrics.items() if k != "concept_read"},
                        "concept_base": ref.concept,
                        "concept_retrained": metrics["concept_read"],
                        "concept_kept": math.nan
                        if q.concept is None or metrics["concept_read"] is None
                        else float(metrics["concept_read"] == q.concept),
                        **retention_stats,
                    }
                )
        del model
    return write_results(cfg, run_dir, rows, ks, plan, queries, query_refs, images, example_queries)


def write_results(
    cfg: DictConfig,
    run_dir: Path,
    rows: list[dict[str, Any]],
    ks: Sequence[int],
    plan: RetrainPlan,
    queries: list[EvalQuery],
    query_refs: dict[int, Reference],
    images: dict[tuple[int, str, int], torch.Tensor],
    example_queries: int,
) -> dict[str, Any]:
    order = {m: n for n, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    rows.sort(key=lambda r: (order[r["method"]], r["k"], r["query"], r["draw"]))
    with open(run_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    metrics = [m for m, _, _ in TABLE_METRICS]
    summary = summarise(rows, metrics)
    table = markdown_table(summary, ks)
    ratios = ratio_lines(summary, ks)
    header = (
        f"Leave-K-out on {len(queries)} queries, base model {plan.base_checkpoint} ({plan.max_steps} steps per "
        f"retrain, {len(plan.jobs)} retrains). Mean ± standard error over queries (random: draws averaged per "
        "query first).\n\n"
    )
    (run_dir / "leave_k_out.md").write_text(header + table + "\n" + "\n".join(ratios) + "\n")
    result = {
        "num_queries": len(queries),
        "k": list(ks),
        "retrains": len(plan.jobs),
        "summary": {m: {str(k): v for k, v in per_k.items()} for m, per_k in summary.items()},
    }
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    plot = plot_delta_loss(summary, run_dir / "delta_loss_vs_k.png")
    grid = before_after_figure(
        run_dir / "before_after.png", queries, query_refs, images, summary, ks, example_queries
    )
    print(header + table + "\n" + "\n".join(ratios))
    _log_to_wandb(cfg, run_dir, rows, [plot] + ([grid] if grid else []), summary)
    return result


def before_after_figure(
    path: Path,
    queries: list[EvalQuery],
    refs: dict[int, Reference],
    images: dict[tuple[int, str, int], torch.Tensor],
    summary: dict[str, Any],
    ks: Sequence[int],
    num_queries: int,
) -> Path | None:
    """Rows: a few queries; columns: θ₀'s image, then each method × K's retrained image (same seed)."""
    shown = [q for q in queries if refs[q.index].image is not None][:num_queries]
    if not shown:
        return None
    columns = [(m, k) for m in summary for k in ks]
    tiles, titles = [], []
    for q in shown:
        tiles.append(refs[q.index].image)
        titles.append(f"q{q.index} θ₀\n{q.caption[:28]}")
        for m, k in columns:
            image = images.get((q.index, m, k))
            tiles.append(image if image is not None else torch.ones_like(refs[q.index].image))
            titles.append(f"{m[:14]}\nK={k}")
    return titled_grid(
        torch.stack(tiles), titles, path, ncol=len(columns) + 1,
        suptitle="the query generated before (θ₀) and after removing each method's top-K (same prompt, seed, noise)",
    )  # fmt: skip


def _log_to_wandb(
    cfg: DictConfig, run_dir: Path, rows: list[dict[str, Any]], pngs: list[Path], summary: dict[str, Any]
) -> None:
    logger_cfg = cfg.get("logger")
    if not logger_cfg or "Wandb" not in str(logger_cfg.get("_target_", "")):
        return
    group = logger_cfg.get("group") or f"leave_k_out/{run_dir.name}"
    logger = hydra.utils.instantiate(logger_cfg, group=group)
    columns = list(rows[0])
    logger.log_table("leave_k_out/results", columns=columns, data=[[r[c] for c in columns] for r in rows])
    flat = {
        f"leave_k_out/{m}/k{k}/{metric}": stats["mean"]
        for m, per_k in summary.items()
        for k, values in per_k.items()
        for metric, stats in values.items()
        if not math.isnan(stats["mean"])
    }
    logger.log_metrics(flat)
    for png in pngs:
        logger.log_image(f"leave_k_out/{png.stem}", [str(png)])
    logger.experiment.finish()
