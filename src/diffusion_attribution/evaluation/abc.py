"""`python evaluate.py benchmark=abc scores='[<attribute.py run dirs>...]'`: the AbC benchmark's
retrieval evaluation (Wang et al., ICCV 2023), Recall@K and mAP of the exemplars a customized model
was trained on, per concept and averaged, split by object versus style concepts.

Each run directory holds scores.npy and ranking.json of one method on one customized model's pool;
every query record carries its ground truth (`relevant_ids`, the exemplar ids), its `concept` and
`concept_type` (object / style), as the AbC query files do. A directory given that is not a run
directory is searched for run directories (every folder below it with a ranking.json). Per query:
Recall@K = exemplars in the top K / number of exemplars, AP = (1/P) Σᵢ i / rankᵢ over the exemplars'
1-based ranks (evaluation/retrieval.py, torchmetrics). A concept's value is the mean over its
queries; a concept type's value the mean over its concepts (each concept counts once).

Writes abc_queries.csv, abc_concepts.csv, abc_summary.csv, abc.md, metrics.json and abc.png (a
scatter like the paper's Fig. 6: one point per method per concept type, two metrics), and a W&B
table when logger=wandb.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion_attribution.evaluation import report
from diffusion_attribution.evaluation.retrieval import retrieval_metrics

log = logging.getLogger(__name__)

TYPE_ORDER = ("object", "style")
MARKERS = {"object": "o", "style": "^"}


def find_run_dirs(specs: Any) -> list[Path]:
    """Run directories from `scores=`: a directory, a list of them, or parents to search."""
    if specs is None or specs == "" or specs == []:
        raise ValueError(
            "benchmark=abc needs scores='[<attribute.py run dir>, ...]' (directories holding scores.npy and "
            "ranking.json, or folders containing such directories)."
        )
    if isinstance(specs, (ListConfig, DictConfig)):
        specs = OmegaConf.to_container(specs, resolve=True)
    if isinstance(specs, (str, Path)):
        specs = [specs]
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(
                f"scores entry {path} is not a directory (an attribute.py run directory)."
            )
        if (path / "ranking.json").is_file():
            found.append(path)
            continue
        below = sorted(p.parent for p in path.rglob("ranking.json"))
        if not below:
            raise FileNotFoundError(f"{path} holds no ranking.json (no attribute.py run directory in it).")
        found += below
    missing = [str(p / "scores.npy") for p in found if not (p / "scores.npy").is_file()]
    if missing:
        raise FileNotFoundError(f"Run directories without scores.npy: {', '.join(missing)}.")
    return list(dict.fromkeys(found))


def query_rows(run_dir: Path, recall_at: Sequence[int], label: str | None = None) -> list[dict[str, Any]]:
    """Per-query metrics of one run directory (queries without relevant_ids are skipped, logged),
    under `label` (default: the run's method name)."""
    scores = np.load(run_dir / "scores.npy")
    ranking = json.loads((run_dir / "ranking.json").read_text())
    queries = ranking["queries"]
    if scores.shape[0] != len(queries):
        raise ValueError(f"{run_dir}: scores.npy has {scores.shape[0]} rows for {len(queries)} queries.")
    keep = [q for q, query in enumerate(queries) if query.get("relevant_ids")]
    skipped = len(queries) - len(keep)
    if skipped:
        log.warning("%s: %d queries have no relevant_ids (skipped).", run_dir, skipped)
    if not keep:
        return []
    relevant = [np.asarray(queries[q]["relevant_ids"], dtype=np.int64) for q in keep]
    bad = [q for q, ids in zip(keep, relevant, strict=True) if ids.min() < 0 or ids.max() >= scores.shape[1]]
    if bad:
        raise ValueError(f"{run_dir}: queries {bad} have relevant_ids outside 0..{scores.shape[1] - 1}.")
    metrics = retrieval_metrics(scores[keep], relevant, precision_at=(), recall_at=tuple(recall_at))
    rows = []
    for q, values in zip(keep, metrics, strict=True):
        query = queries[q]
        rows.append(
            {
                "method": label or ranking.get("method", "unknown"),
                "run": str(run_dir),
                "query": q,
                "concept": str(query.get("concept", "unknown")),
                "concept_type": str(query.get("concept_type", "unknown")),
                "caption": query.get("caption") or query.get("prompt"),
                "num_relevant": len(query["relevant_ids"]),
                **values,
            }
        )
    return rows


def summarise(rows: list[dict[str, Any]], metric_names: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """(per method x concept means over queries, per method x concept type means over concepts)."""
    by_concept: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for row in rows:
        by_concept[(row["method"], row["concept_type"], row["concept"])].append(row)
    concepts = [
        {
            "method": method,
            "concept_type": kind,
            "concept": concept,
            "num_queries": len(group),
            **{m: float(np.mean([r[m] for r in group])) for m in metric_names},
        }
        for (method, kind, concept), group in sorted(by_concept.items())
    ]
    by_type: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in concepts:
        by_type[(row["method"], row["concept_type"])].append(row)
        by_type[(row["method"], "all")].append(row)
    summary = []
    for (method, kind), group in by_type.items():
        stats = {m: report.mean_and_sem([r[m] for r in group]) for m in metric_names}
        summary.append(
            {
                "method": method,
                "concept_type": kind,
                "num_concepts": len(group),
                "num_queries": sum(r["num_queries"] for r in group),
                **{m: mean for m, (mean, _) in stats.items()},
                **{f"{m}_sem": sem for m, (_, sem) in stats.items()},
            }
        )
    order = {k: n for n, k in enumerate((*TYPE_ORDER, "all"))}
    summary.sort(key=lambda r: (order.get(r["concept_type"], 9), r["concept_type"], r["method"]))
    return concepts, summary


def _label(name: str) -> str:
    return "mAP" if name == "ap" else name.replace("recall@", "Recall@")


def markdown(concepts: list[dict], summary: list[dict], metric_names: Sequence[str]) -> str:
    labels = [_label(m) for m in metric_names]
    by_type = [
        [
            f"{row['concept_type']} ({row['num_concepts']} concepts, {row['num_queries']} queries)",
            row["method"],
            *(report.format_mean_sem(row[m], row[m + "_sem"]) for m in metric_names),
        ]
        for row in summary
    ]
    by_concept = [
        [
            row["concept"],
            row["concept_type"],
            row["method"],
            row["num_queries"],
            *(f"{row[m]:.3f}" for m in metric_names),
        ]
        for row in concepts
    ]
    return (
        "Mean over concepts (± s.e. over concepts); a concept's value is the mean over its queries.\n\n"
        + report.markdown_table(["concepts", "method", *labels], by_type)
        + "\n\nPer concept:\n\n"
        + report.markdown_table(["concept", "type", "method", "queries", *labels], by_concept)
        + "\n"
    )


def scatter_plot(summary: list[dict], x: str, y: str, path: Path) -> Path:
    """One point per method per concept type (the paper's Fig. 6 layout): `x` against `y`."""
    plt = report.pyplot()
    methods = sorted({r["method"] for r in summary})
    colours = {m: plt.get_cmap("tab10")(k % 10) for k, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for row in summary:
        if row["concept_type"] == "all":
            continue
        ax.errorbar(
            row[x],
            row[y],
            xerr=row[x + "_sem"],
            yerr=row[y + "_sem"],
            fmt=MARKERS.get(row["concept_type"], "s"),
            color=colours[row["method"]],
            markersize=9,
            capsize=2,
            alpha=0.9,
        )
        ax.annotate(row["method"], (row[x], row[y]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    handles = [plt.Line2D([], [], color=colours[m], marker="s", linestyle="", label=m) for m in methods]
    kinds = sorted({r["concept_type"] for r in summary if r["concept_type"] != "all"})
    handles += [
        plt.Line2D([], [], color="gray", marker=MARKERS.get(k, "s"), linestyle="", label=f"{k} concepts")
        for k in kinds
    ]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xlabel(_label(x))
    ax.set_ylabel(_label(y))
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("AbC exemplar retrieval (mean ± s.e. over concepts)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def run_abc_benchmark(
    cfg: DictConfig,
    run_dir: str | Path,
    scores: Any = None,
    recall_at: Sequence[int] = (5, 10, 100),
    scatter: Sequence[str] = ("recall@10", "ap"),
) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run_dirs = find_run_dirs(scores)
    recall_at = [int(k) for k in recall_at]
    metric_names = [f"recall@{k}" for k in recall_at] + ["ap"]
    unknown = [m for m in scatter if m not in metric_names]
    if len(scatter) != 2 or unknown:
        raise ValueError(f"benchmark.scatter must name two of {metric_names}; got {list(scatter)}.")
    # Variants of one method (e.g. pruned and full, or two dampings) get their own rows; the runs of one
    # variant (one per concept) share a label.
    labels = report.variant_labels([json.loads((d / "ranking.json").read_text()) for d in run_dirs])
    rows = [row for d, label in zip(run_dirs, labels, strict=True) for row in query_rows(d, recall_at, label)]
    if not rows:
        raise ValueError("No query in the given run directories has relevant_ids: nothing to evaluate.")
    concepts, summary = summarise(rows, metric_names)
    report.write_csv(run_dir / "abc_queries.csv", rows)
    report.write_csv(run_dir / "abc_concepts.csv", concepts)
    report.write_csv(run_dir / "abc_summary.csv", summary)
    table = markdown(concepts, summary, metric_names)
    report.write_text(run_dir / "abc.md", table)
    png = scatter_plot(summary, scatter[0], scatter[1], run_dir / "abc.png")
    result = {"runs": [str(d) for d in run_dirs], "summary": summary, "concepts": concepts}
    overall = next(r for r in summary if r["concept_type"] == "all")
    report.with_headline(result, f"map/{overall['method']}", overall["ap"])
    report.write_json(run_dir / "metrics.json", result)
    report.log_to_wandb(cfg.get("logger"), tables={"abc/summary": summary}, images={"abc/scatter": png})
    print(table)
    log.info(
        "AbC evaluation of %d runs (%d queries): %s, %s", len(run_dirs), len(rows), run_dir / "abc.md", png
    )
    return result
