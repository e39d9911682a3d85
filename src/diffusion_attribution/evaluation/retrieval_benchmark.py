"""`evaluate.py benchmark=retrieval scores=<attribute run dir>`: how well a ranking retrieves the
training images known to be responsible for a query (metrics: evaluation/retrieval.py).

Ground truth comes from the data's metadata. A query record in ranking.json may list its
`relevant_ids` itself (AbC-style exemplars); otherwise, when the training metadata has a `concept`
field (the embedded world's rare concepts), the relevant images of a query are the training images of
the concept its caption names. Queries without ground truth are skipped and reported. Several run
directories (`scores='[<run dir>,<run dir>,...]'`) give the method comparison (evaluation/comparison.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.evaluation import report
from diffusion_attribution.evaluation.comparison import run_comparison
from diffusion_attribution.evaluation.retrieval import concept_index, evaluate_run

log = logging.getLogger(__name__)


def run_retrieval_benchmark(
    cfg: DictConfig, run_dir: str | Path, scores: str | list[str] | None = None
) -> dict[str, Any]:
    """One run directory: per-query metrics (retrieval.csv/.md, metrics.json). Several (a list):
    the method comparison table (see evaluation/comparison.py)."""
    if OmegaConf.is_config(scores):
        scores = OmegaConf.to_container(scores, resolve=True)  # type: ignore[assignment]
    if isinstance(scores, (list, tuple)):
        if len(scores) > 1:
            return run_comparison(cfg, run_dir, [str(s) for s in scores])
        scores = str(scores[0]) if scores else None
    if not scores:
        raise ValueError(
            "benchmark=retrieval needs scores=<run directory of attribute.py> (holds scores.npy), or "
            "scores='[<run dir>,<run dir>,...]' to compare methods."
        )
    datamodule: CaptionedImageDataModule = hydra.utils.instantiate(cfg.data)
    result = evaluate_run(scores, datamodule, concept_index(datamodule))
    rows, mean, sem, names = result.rows, result.mean, result.sem, result.metric_names
    summary = report.with_headline(result.summary(), "map", mean.get("ap"))

    run_dir = Path(run_dir)
    report.write_csv(run_dir / "retrieval.csv", rows)
    report.write_json(run_dir / "metrics.json", summary)
    body = [[r["query"], r["caption"], *(f"{r[n]:.3f}" for n in names)] for r in rows]
    body.append(["**mean ± s.e.**", "", *(report.format_mean_sem(mean[n], sem[n]) for n in names)])
    report.write_text(
        run_dir / "retrieval.md", report.markdown_table(["query", "caption", *names], body) + "\n"
    )
    report.log_to_wandb(
        cfg.get("logger"),
        metrics={f"retrieval/{k}": v for k, v in summary["mean"].items()},
        tables={"retrieval/per_query": rows},
    )
    log.info("Retrieval (%s, %d queries): %s", summary["method"], len(rows), mean)
    return summary
