"""`evaluate.py benchmark=retrieval scores='[<run dir>,<run dir>,...]'`: attribution methods side by
side on the same queries.

One row per attribute.py run: Precision@10, Recall@10 and mAP (mean ± standard error over the queries
with ground truth), the time to prepare (cacheable per-model work: Fisher, loss sweeps, projected
gradients, features), the scoring time per query and the training-side storage the method keeps.
Written as comparison.csv / comparison.md, a bar chart comparison.png (mAP and P@10 with error bars),
comparison_per_query.csv (every run's per-query metrics) and, with logger=wandb, a W&B table.

Each row also has the run's hub share (evaluation/hubness.py): the share of the top-K slots (K =
benchmark.hub_top_k, 10) held by training images that enter the top K of at least
benchmark.hub_min_queries queries without being relevant to them; column "hub share of top-10" in
comparison.md, `hub_share@10` (with `_sem` and `hub_images@10`) in comparison.csv. hubness.png plots
it per method, hubness_histogram.png how many queries each image enters irrelevantly, and hubness.csv
lists every run's top hubs.

Runs are only comparable on the same queries: every run must list the same queries (prompts, seeds
and sampler settings, or images and captions, and the same ground truth) and the same model, else the
comparison is refused.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.evaluation import hubness, report
from diffusion_attribution.evaluation.retrieval import (
    RetrievalResult,
    check_same_model,
    concept_index,
    evaluate_run,
)

log = logging.getLogger(__name__)

# (metric key, table heading) of the comparison table and chart.
TABLE_METRICS = (("precision@10", "P@10"), ("recall@10", "R@10"), ("ap", "mAP"))
# Query-record fields that are per run, not part of what was asked.
RUN_SPECIFIC_QUERY_KEYS = frozenset({"saved_image", "top_k", "diagnostics"})


class QueryMismatchError(ValueError):
    pass


def query_key(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in RUN_SPECIFIC_QUERY_KEYS}


def same_model(a: str, b: str) -> bool:
    """The same checkpoint, however it was spelled (a symlink, a relative path)."""
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def check_same_queries(results: list[RetrievalResult], dirs: list[str]) -> None:
    """Every run attributed the same queries with the same model (else the rows measure different
    things); the error names the first difference."""
    first = [query_key(q) for q in results[0].ranking["queries"]]
    model = results[0].ranking.get("model")
    for result, run in zip(results[1:], dirs[1:], strict=True):
        other_model = result.ranking.get("model")
        if model and other_model and not same_model(str(model), str(other_model)):
            raise QueryMismatchError(
                f"{run} attributed the model {other_model} but {dirs[0]} the model {model}: compare runs "
                "of the same model (their generated queries differ otherwise)."
            )
        queries = [query_key(q) for q in result.ranking["queries"]]
        if len(queries) != len(first):
            raise QueryMismatchError(
                f"{run} has {len(queries)} queries but {dirs[0]} has {len(first)}: a comparison needs every "
                "run on the same queries. Rerun attribute.py with the same query.* settings."
            )
        for k, (mine, theirs) in enumerate(zip(first, queries, strict=True)):
            if mine != theirs:
                differ = sorted(key for key in set(mine) | set(theirs) if mine.get(key) != theirs.get(key))
                raise QueryMismatchError(
                    f"Query {k} differs between {dirs[0]} and {run} in {differ}: "
                    f"{ {d: mine.get(d) for d in differ} } vs { {d: theirs.get(d) for d in differ} }. A comparison "
                    "needs every run on the same queries (same prompts and seeds, or images and captions): "
                    "rerun attribute.py with the same query.* settings."
                )


def method_labels(results: list[RetrievalResult], dirs: list[str]) -> list[str]:
    """report.variant_labels, then runs still equal (identical settings) told apart by their run
    directory's name, or numbered."""
    labels = report.variant_labels([r.ranking for r in results])
    counts = Counter(labels)
    labels = [
        f"{label} [{Path(d).name}]" if counts[label] > 1 else label
        for label, d in zip(labels, dirs, strict=True)
    ]
    counts, seen = Counter(labels), Counter()
    for k, label in enumerate(labels):  # same folder name too: number them
        if counts[label] > 1:
            seen[label] += 1
            labels[k] = f"{label} #{seen[label]}"
    return labels


def comparison_rows(
    results: list[RetrievalResult], dirs: list[str], hubs: list[hubness.Hubness] | None = None
) -> list[dict[str, Any]]:
    rows = []
    labels = method_labels(results, dirs)
    for k, (result, label, run) in enumerate(zip(results, labels, dirs, strict=True)):
        ranking = result.ranking
        timing = ranking.get("timing") or {}
        num_queries = len(ranking["queries"])
        row: dict[str, Any] = {"method": label, "queries": len(result.rows)}
        for key, _ in TABLE_METRICS:
            row[key] = result.mean[key]
            row[f"{key}_sem"] = result.sem[key]
        if hubs is not None:
            hub = hubs[k]
            row[f"hub_share@{hub.top_k}"] = hub.hub_share
            row[f"hub_share@{hub.top_k}_sem"] = hub.hub_share_sem
            row[f"hub_images@{hub.top_k}"] = len(hub.hubs)
        row["prepare_s"] = timing.get("prepare_s")
        score_s = timing.get("score_s")
        row["s_per_query"] = None if score_s is None else score_s / num_queries
        row["train_side_mb"] = ranking.get("train_side_mb")
        row["run"] = str(run)
        rows.append(row)
    return rows


def _cell(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def markdown_table(rows: list[dict[str, Any]], hub_top_k: int | None = None) -> str:
    heads = [head for _, head in TABLE_METRICS]
    hub_key = None if hub_top_k is None else f"hub_share@{hub_top_k}"
    if hub_key is not None:
        heads.append(hubness.share_heading(hub_top_k))
    body = [
        [
            row["method"],
            *(report.format_mean_sem(row[key], row[f"{key}_sem"]) for key, _ in TABLE_METRICS),
            *([] if hub_key is None else [report.format_mean_sem(row[hub_key], row[f"{hub_key}_sem"])]),
            _cell(row["prepare_s"], ".3g"),
            _cell(row["s_per_query"], ".3g"),
            _cell(row["train_side_mb"], ".1f"),
        ]
        for row in rows
    ]
    return report.markdown_table(["method", *heads, "prepare s", "s / query", "train side MB"], body)


def comparison_figure(rows: list[dict[str, Any]], path: Path, num_queries: int) -> Path:
    return report.bar_chart(
        path,
        [row["method"] for row in rows],
        {
            head: ([row[key] for row in rows], [row[f"{key}_sem"] for row in rows])
            for key, head in (("ap", "mAP"), ("precision@10", "Precision@10"))
        },
        ylabel=f"mean ± s.e. over {num_queries} queries",
        suptitle="Attribution methods on the same queries",
        ylim=(0, 1.1),
        annotate=True,
        figsize=(max(6.0, 1.6 + 1.3 * len(rows)), 3.8),
    )


def run_comparison(
    cfg: DictConfig, run_dir: str | Path, dirs: list[str], hubs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`hubs`: the hub diagnostic's settings, {"top_k", "min_queries", "list_size"} (defaults of
    evaluation/hubness.py where absent)."""
    run_dir = Path(run_dir)
    hubs = hubs or {}
    top_k = int(hubs.get("top_k", hubness.DEFAULT_TOP_K))
    min_queries = hubs.get("min_queries", hubness.DEFAULT_MIN_QUERIES)
    list_size = int(hubs.get("list_size", hubness.DEFAULT_LIST_SIZE))
    datamodule: CaptionedImageDataModule = hydra.utils.instantiate(cfg.data)
    concepts = concept_index(datamodule)
    results = [evaluate_run(d, datamodule, concepts) for d in dirs]
    check_same_model([r.ranking for r in results], dirs)
    check_same_queries(results, dirs)
    hub_results = [hubness.run_hubness(r, top_k, min_queries) for d, r in zip(dirs, results, strict=True)]
    rows = comparison_rows(results, dirs, hub_results)

    report.write_csv(run_dir / "comparison.csv", rows)
    report.write_csv(
        run_dir / "comparison_per_query.csv",
        [{"method": row["method"], **q} for row, r in zip(rows, results, strict=True) for q in r.rows],
    )
    num_queries = len(results[0].rows)
    table = markdown_table(rows, top_k)
    note = (
        f"{num_queries} queries with ground truth; mean ± standard error over queries. "
        f"{hubness.describe(hub_results[0])} Prepare: per-model "
        "work (cached and reused by later runs); s / query: scoring time per query; train side: what the "
        "method keeps on disk for scoring."
    )
    report.write_text(run_dir / "comparison.md", f"{table}\n\n{note}\n")
    png = comparison_figure(rows, run_dir / "comparison.png", num_queries)
    by_method = {row["method"]: hub for row, hub in zip(rows, hub_results, strict=True)}
    hub_png = hubness.share_plot(run_dir / "hubness.png", by_method)
    histogram_png = hubness.histogram_plot(run_dir / "hubness_histogram.png", by_method)
    hub_lists = {m: hubness.hub_list(hub, datamodule, list_size) for m, hub in by_method.items()}
    hub_csv = [row for m, listed in hub_lists.items() for row in hubness.csv_rows(listed, m)]
    if hub_csv:
        report.write_csv(run_dir / "hubness.csv", hub_csv)
    summary = {
        "num_queries": num_queries,
        "methods": rows,
        "hubness": {m: hub.summary(hub_lists[m]) for m, hub in by_method.items()},
    }
    best = max(rows, key=lambda row: row["ap"])
    report.with_headline(summary, f"map/{best['method']}", best["ap"])
    report.write_json(run_dir / "metrics.json", summary)
    report.log_to_wandb(
        cfg.get("logger"),
        tables={"retrieval/comparison": rows},
        images={"retrieval/comparison_chart": png, "retrieval/hubness": [hub_png, histogram_png]},
    )
    log.info("Comparison of %d runs on %d queries:\n%s", len(rows), num_queries, table)
    return summary
