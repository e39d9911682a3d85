"""`evaluate.py benchmark=lds scores='[<attribute run>, ...]'`: the linear datamodeling score (LDS,
as used by TRAK and D-TRAK). Draw M random subsets S_m holding `subset_fraction` of the training set,
retrain on each (the same keyed Hydra jobs as leave-K-out, evaluation/retraining.py: the subsets do not
depend on the method, so one set of M retrains serves every method and is reused across runs), measure
each query's loss L(ẑ, θ_Sm) on the fixed-noise timestep grid of leave-K-out, and correlate:

    LDS(ẑ) = Spearman over m of ( Σ_{i ∈ S_m} τ(ẑ, i),  −L(ẑ, θ_Sm) )

Attribution scores are "higher = more influential" (removing the example raises the query's loss), so
a subset holding more of the query's high-scored examples should give a *lower* loss: the prediction is
correlated with −L. The score is averaged over queries (mean ± standard error).

Retraining settings: the `benchmark.retrain` node shared with leave-K-out (evaluation/retraining.py:
RetrainSettings). Outputs: plan.md/plan.json, lds.csv (method × query), subset_losses.csv (subset ×
query), lds.md, metrics.json, lds.png (and W&B with logger=wandb).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torchmetrics.functional import spearman_corrcoef

from diffusion_attribution.compute.devices import device_from_trainer
from diffusion_attribution.evaluation import report
from diffusion_attribution.evaluation.leave_k_out.metrics import fixed_noise_loss, loss_timesteps
from diffusion_attribution.evaluation.leave_k_out.runs import load_attribution_runs, load_model, load_queries
from diffusion_attribution.evaluation.retraining import RetrainJob, RetrainSettings, random_exclusion

log = logging.getLogger(__name__)

LDS_RANDOM = 2  # random_exclusion keys: (2, M-index, kept size)


class LDSError(ValueError):
    pass


def subset_masks(num_examples: int, num_subsets: int, fraction: float, seed: int) -> np.ndarray:
    """bool [M, N]: True where example i is in (trained on by) subset m. Keyed by (seed, m, size)."""
    if not 0 < fraction < 1:
        raise LDSError(f"benchmark.subset_fraction must be in (0, 1), got {fraction}.")
    if num_subsets < 2:
        raise LDSError(f"benchmark.num_subsets must be at least 2 for a correlation, got {num_subsets}.")
    kept = int(round(fraction * num_examples))
    masks = np.ones((num_subsets, num_examples), dtype=bool)
    for m in range(num_subsets):
        masks[m, random_exclusion(num_examples, num_examples - kept, seed, LDS_RANDOM, m, kept)] = False
    return masks


def linear_datamodeling_scores(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Per-query LDS [Q]: Spearman correlation over subsets between the summed scores of each
    subset (scores [Q, N], masks [M, N]) and the negated measured losses (losses [M, Q])."""
    if scores.shape[1] != masks.shape[1] or losses.shape != (masks.shape[0], scores.shape[0]):
        raise LDSError(
            f"Shapes do not match: scores {scores.shape}, subsets {masks.shape}, losses {losses.shape} "
            "(expected [Q, N], [M, N], [M, Q])."
        )
    predicted = torch.as_tensor(masks.astype(np.float64) @ scores.astype(np.float64).T)  # [M, Q]
    measured = -torch.as_tensor(losses, dtype=torch.float64)
    return spearman_corrcoef(predicted, measured).reshape(-1).numpy()


def run_lds_benchmark(
    cfg: DictConfig,
    run_dir: str | Path,
    scores: Sequence[str] | str | None = None,
    num_subsets: int = 32,
    subset_fraction: float = 0.5,
    seed: int = 0,
    retrain: RetrainSettings | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    settings = RetrainSettings.coerce(retrain)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    runs = load_attribution_runs(scores)
    num_train = runs[0].scores.shape[1]
    plan = settings.plan(Path(str(runs[0].ranking.get("model"))), num_train)
    masks = subset_masks(num_train, num_subsets, subset_fraction, seed)
    jobs: list[RetrainJob] = [
        plan.request(np.flatnonzero(~mask), benchmark="lds", subset=m) for m, mask in enumerate(masks)
    ]
    planned = settings.announce(plan, run_dir)
    if settings.dry_run:
        return report.with_headline(planned, "estimated_hours", planned["estimated_hours"])
    settings.launch(plan)

    queries = load_queries(runs[0], {})
    loss_seed = int(cfg.get("seed", 0))
    device = device_from_trainer(cfg.get("trainer"))
    losses = np.zeros((len(jobs), len(queries)), dtype=np.float64)
    timesteps: list[int] | None = None
    for m, job in enumerate(jobs):
        model = load_model(job.checkpoint, device=device)
        timesteps = timesteps or loss_timesteps(model, settings.timestep_stride)
        for q in queries:
            losses[m, q.index] = fixed_noise_loss(
                model, q.latent, q.caption, q.noise_key, timesteps, loss_seed, settings.loss_batch_size
            )
        log.info("LDS subset %d/%d: mean query loss %.5f", m + 1, len(jobs), losses[m].mean())
        del model

    rows, summary = [], {}
    for run in runs:
        per_query = linear_datamodeling_scores(run.scores, masks, losses)
        mean, sem = report.mean_and_sem(per_query.tolist())
        summary[run.method] = {"mean": mean, "sem": sem, "n": int(np.isfinite(per_query).sum())}
        rows += [
            {"method": run.method, "query": q.index, "caption": q.caption, "lds": float(v)}
            for q, v in zip(queries, per_query, strict=True)
        ]
    report.write_csv(run_dir / "lds.csv", rows)
    report.write_csv(
        run_dir / "subset_losses.csv",
        [
            {
                "subset": m,
                "exclusion": job.key,
                **{f"query_{q.index}": float(losses[m, n]) for n, q in enumerate(queries)},
            }
            for m, job in enumerate(jobs)
        ],
    )
    table = report.markdown_table(
        ["method", "LDS"], [[m, report.format_mean_sem(s["mean"], s["sem"])] for m, s in summary.items()]
    )
    text = (
        f"LDS over {num_subsets} random {subset_fraction:.0%} subsets ({plan.max_steps} steps per retrain), "
        f"{len(queries)} queries; Spearman(summed scores, −loss), mean ± s.e. over queries.\n\n{table}"
    )
    report.write_text(run_dir / "lds.md", text + "\n")
    result = {
        "num_subsets": num_subsets,
        "subset_fraction": subset_fraction,
        "num_queries": len(queries),
        "lds": summary,
    }
    first = next(iter(summary))
    report.with_headline(result, f"lds/{first}", summary[first]["mean"])
    report.write_json(run_dir / "metrics.json", result)
    plot_lds(summary, run_dir / "lds.png")
    report.log_to_wandb(
        cfg.get("logger"),
        images={"lds/chart": run_dir / "lds.png"},
        tables={"lds/per_query": rows},
        metrics={f"lds/{m}": s["mean"] for m, s in summary.items()},
    )
    print(text)
    return result


def plot_lds(summary: dict[str, dict[str, float]], path: Path) -> Path:
    names = list(summary)
    return report.bar_chart(
        path,
        names,
        {
            "Linear datamodeling score (mean ± s.e. over queries)": (
                [summary[n]["mean"] for n in names],
                [summary[n]["sem"] for n in names],
            )
        },
        ylabel="LDS (Spearman)",
        zero_line=True,
        figsize=(4.5, 3),
    )
