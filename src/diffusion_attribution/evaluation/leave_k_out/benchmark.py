"""`run_leave_k_out_benchmark`: plan the retrains, launch them, measure every retrained model on the
queries that asked for it (all queries for a random set) and write the results (see the package
docstring for what is measured and written)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_attribution.compute.devices import device_from_trainer
from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.evaluation import report
from diffusion_attribution.evaluation.leave_k_out.figures import before_after_figure, plot_delta_loss
from diffusion_attribution.evaluation.leave_k_out.metrics import (
    ImageJudges,
    Reference,
    RetentionPrompt,
    fixed_noise_loss,
    generate_one,
    loss_timesteps,
    model_metrics,
)
from diffusion_attribution.evaluation.leave_k_out.plan import plan_leave_k_out
from diffusion_attribution.evaluation.leave_k_out.runs import (
    AttributionRun,
    EvalQuery,
    LeaveKOutError,
    load_attribution_runs,
    load_model,
    load_queries,
    noise_key,
)
from diffusion_attribution.evaluation.leave_k_out.summary import (
    TABLE_METRICS,
    headline,
    ratio_lines,
    results_tables,
    summarise,
)
from diffusion_attribution.evaluation.retraining import RetrainJob, RetrainPlan, RetrainSettings
from diffusion_attribution.evaluation.retrieval import concept_index
from diffusion_attribution.models.sampling import generate

log = logging.getLogger(__name__)


def run_leave_k_out_benchmark(
    cfg: DictConfig,
    run_dir: str | Path,
    scores: Sequence[str] | str | None = None,
    k: Sequence[int] = (10, 20),
    random_draws: int = 3,
    seed: int = 0,
    retrain: RetrainSettings | Mapping[str, Any] | None = None,
    clip_path: str | None = None,
    reader_cache_dir: str = ".cache/data",
    retention_prompts: Sequence[str] = (),
    retention_seeds: Sequence[int] | None = None,
    example_queries: int = 4,
) -> dict[str, Any]:
    settings = RetrainSettings.coerce(retrain)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ks = sorted({int(v) for v in (k if isinstance(k, Sequence) and not isinstance(k, str) else [k])})
    runs = load_attribution_runs(scores)
    base_checkpoint = Path(str(runs[0].ranking.get("model")))
    num_train = runs[0].scores.shape[1]
    plan = settings.plan(base_checkpoint, num_train)
    entries = plan_leave_k_out(runs, plan, ks, random_draws, seed)
    planned = settings.announce(plan, run_dir)
    if settings.dry_run:
        log.info("Dry run: %d retrains planned (plan.md); nothing trained.", len(plan.jobs))
        return report.with_headline(planned, "estimated_hours", planned["estimated_hours"])
    settings.launch(plan)
    return evaluate_leave_k_out(
        cfg, run_dir, runs, plan, entries, ks, settings, clip_path,
        reader_cache_dir, list(retention_prompts), retention_seeds, example_queries,
    )  # fmt: skip


def base_datamodule(plan: RetrainPlan) -> CaptionedImageDataModule:
    """The base model's own training data (its recorded config, exclusions dropped): ids match."""
    data_cfg = OmegaConf.masked_copy(plan.base_config, ["data"]).data
    data_cfg.exclude = None
    return hydra.utils.instantiate(data_cfg)


def evaluate_leave_k_out(
    cfg: DictConfig,
    run_dir: Path,
    runs: Sequence[AttributionRun],
    plan: RetrainPlan,
    entries: list[dict[str, Any]],
    ks: Sequence[int],
    settings: RetrainSettings,
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
    device = device_from_trainer(cfg.get("trainer"))
    base = load_model(plan.base_checkpoint, attributed=runs[0], device=device)
    timesteps = loss_timesteps(base, settings.timestep_stride)
    query_refs = {}
    for q in queries:
        image = (
            generate_one(base, q.prompt, q.seed, q.sampler)
            if q.prompt is not None and q.seed is not None
            else None
        )
        loss = fixed_noise_loss(
            base, q.latent, q.caption, q.noise_key, timesteps, loss_seed, settings.loss_batch_size
        )
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
        loss = fixed_noise_loss(
            base, item.latent, prompt, item.key, timesteps, loss_seed, settings.loss_batch_size
        )
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
        model = load_model(job.checkpoint, device=device)
        log.info("Evaluating retrain %d/%d (%s)", n + 1, len(by_job), key)
        kept = {}
        for item, ref in zip(retention, retention_refs, strict=True):
            metrics, _ = model_metrics(
                model, item.latent, item.prompt, item.key, item.prompt, item.seed, sampler, ref, judges,
                timesteps, loss_seed, settings.loss_batch_size,
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
                    timesteps, loss_seed, settings.loss_batch_size,
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
    report.write_csv(run_dir / "results.csv", rows)
    summary = summarise(rows, [m for m, _, _ in TABLE_METRICS])
    table = results_tables(summary, ks)
    ratios = ratio_lines(summary, ks)
    header = (
        f"Leave-K-out on {len(queries)} queries, base model {plan.base_checkpoint} ({plan.max_steps} steps per "
        f"retrain, {len(plan.jobs)} retrains). Mean ± standard error over queries (random: draws averaged per "
        "query first).\n\n"
    )
    report.write_text(run_dir / "leave_k_out.md", header + table + "\n" + "\n".join(ratios) + "\n")
    result = {
        "num_queries": len(queries),
        "k": list(ks),
        "retrains": len(plan.jobs),
        "summary": {m: {str(k): v for k, v in per_k.items()} for m, per_k in summary.items()},
    }
    report.with_headline(result, *headline(summary, ks))
    report.write_json(run_dir / "metrics.json", result)
    plot = plot_delta_loss(summary, run_dir / "delta_loss_vs_k.png")
    grid = before_after_figure(
        run_dir / "before_after.png", queries, query_refs, images, summary, ks, example_queries
    )
    print(header + table + "\n" + "\n".join(ratios))
    logger_cfg = cfg.get("logger")
    report.log_to_wandb(
        logger_cfg,
        images={f"leave_k_out/{png.stem}": png for png in [plot] + ([grid] if grid else [])},
        tables={"leave_k_out/results": rows},
        metrics={
            f"leave_k_out/{m}/k{k}/{metric}": stats["mean"]
            for m, per_k in summary.items()
            for k, values in per_k.items()
            for metric, stats in values.items()
        },
        group=(logger_cfg.get("group") if logger_cfg else None) or f"leave_k_out/{run_dir.name}",
    )
    return result
