"""`evaluate.py benchmark=retrieval scores=<attribute run dir>`: how well a ranking retrieves the
training images known to be responsible for a query (metrics: evaluation/retrieval.py).

Ground truth comes from the data's metadata. A query record in ranking.json may list its
`relevant_ids` itself (AbC-style exemplars); otherwise, when the training metadata has a `concept`
field (the embedded world's rare concepts), the relevant images of a query are the training images of
the concept its caption names. Queries without ground truth are skipped and reported. Several run
directories (`scores='[<run dir>,<run dir>,...]'`) give the method comparison (evaluation/comparison.py).

Both also report hub images (evaluation/hubness.py): training images in the top `benchmark.hub_top_k`
of at least `benchmark.hub_min_queries` queries without being relevant to them. One run: hubness.md
(hub share, the top `benchmark.hub_list_size` hubs, the histogram), hubness.csv (the listed hubs),
hubness_histogram.png and metrics.json's "hubness" entry.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.evaluation import hubness, report
from diffusion_attribution.evaluation.comparison import run_comparison
from diffusion_attribution.evaluation.retrieval import concept_index, evaluate_run

log = logging.getLogger(__name__)


def run_retrieval_benchmark(
    cfg: DictConfig,
    run_dir: str | Path,
    scores: str | list[str] | None = None,
    hub_top_k: int = hubness.DEFAULT_TOP_K,
    hub_min_queries: float = hubness.DEFAULT_MIN_QUERIES,
    hub_list_size: int = hubness.DEFAULT_LIST_SIZE,
) -> dict[str, Any]:
    """One run directory: per-query metrics (retrieval.csv/.md, metrics.json) and its hub images
    (hubness.md/.csv/_histogram.png). Several (a list): the method comparison table (see
    evaluation/comparison.py)."""
    hubs = {"top_k": int(hub_top_k), "min_queries": hub_min_queries, "list_size": int(hub_list_size)}
    if OmegaConf.is_config(scores):
        scores = OmegaConf.to_container(scores, resolve=True)  # type: ignore[assignment]
    if isinstance(scores, (list, tuple)):
        if len(scores) > 1:
            return run_comparison(cfg, run_dir, [str(s) for s in scores], hubs=hubs)
        scores = str(scores[0]) if scores else None
    if not scores:
        raise ValueError(
            "benchmark=retrieval needs scores=<run directory of attribute.py> (holds scores.npy), or "
            "scores='[<run dir>,<run dir>,...]' to compare methods."
        )
    datamodule: CaptionedImageDataModule = hydra.utils.instantiate(cfg.data)
    concepts = concept_index(datamodule)
    result = evaluate_run(scores, datamodule, concepts)
    rows, mean, sem, names = result.rows, result.mean, result.sem, result.metric_names
    summary = report.with_headline(result.summary(), "map", mean.get("ap"))

    run_dir = Path(run_dir)
    hub = hubness.run_hubness(result, hubs["top_k"], hubs["min_queries"])
    hub_rows = hubness.hub_list(hub, datamodule, hubs["list_size"])
    summary["hubness"] = hub.summary(hub_rows)
    report.write_text(run_dir / "hubness.md", hubness.markdown(hub, hub_rows))
    if hub_rows:
        report.write_csv(run_dir / "hubness.csv", hubness.csv_rows(hub_rows))
    hub_png = hubness.histogram_plot(run_dir / "hubness_histogram.png", {str(summary["method"]): hub})
    report.write_csv(run_dir / "retrieval.csv", rows)
    report.write_json(run_dir / "metrics.json", summary)
    body = [[r["query"], r["caption"], *(f"{r[n]:.3f}" for n in names)] for r in rows]
    body.append(["**mean ± s.e.**", "", *(report.format_mean_sem(mean[n], sem[n]) for n in names)])
    report.write_text(
        run_dir / "retrieval.md", report.markdown_table(["query", "caption", *names], body) + "\n"
    )
    report.log_to_wandb(
        cfg.get("logger"),
        metrics={
            **{f"retrieval/{k}": v for k, v in summary["mean"].items()},
            f"retrieval/hub_share@{hub.top_k}": hub.hub_share,
        },
        tables={
            "retrieval/per_query": rows,
            **({"retrieval/hubs": hubness.csv_rows(hub_rows)} if hub_rows else {}),
        },
        images={"retrieval/hubness": hub_png},
    )
    log.info("Retrieval (%s, %d queries): %s", summary["method"], len(rows), mean)
    log.info(
        "Hub images: %d; they hold %.3f of the top-%d slots (hubness.md)",
        len(hub.hubs),
        hub.hub_share,
        hub.top_k,
    )
    return summary
