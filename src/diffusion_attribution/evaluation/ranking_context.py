"""`evaluate.py benchmark=ranking_context scores='[<attribute run dir>,...]' [benchmark.top=20]`: what a
ranking's top K shares with its query besides the concept: colour, shape, background.

For every query of an attribute.py run on the embedded world (data=shapes), reads the query's colour,
shape and background from its caption and counts, among the top K training images, those of the asked
concept, of another rare concept and plain ones; then, for the images of another concept, how often
they share the query's colour, shape and background, against the rate over the whole training set.
A ranking that finds "rare images drawn like the query" rather than "images of the query's concept"
shows same-context rates far above the base rates (why mAP can stay low).

On an embedded-AbC run (data=abc_embedded) it counts, per query, the exemplars in the top K and how
many of them are drawn on the query's background (object queries that find only the exemplars sharing
the query's background).

Each run is read with the data it was attributed on (its config.yaml). Writes ranking_context.md (a
table per run), ranking_context.csv (one row per run and query) and metrics.json; the headline is the
first run's share of its top K that is the asked concept (or exemplars).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion_attribution.data.shapes import BACKGROUNDS, COLOURS, SHAPES, ShapesDataModule
from diffusion_attribution.evaluation import report
from diffusion_attribution.evaluation.retrieval import concept_index, relevant_ids_for

log = logging.getLogger(__name__)

ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "background": tuple(BACKGROUNDS)}


def caption_attributes(caption: str) -> dict[str, str | None]:
    """The colour, shape and background words of a world caption (None when absent). The world's
    object colours, shapes and backgrounds are disjoint word sets, so the first match of each is it."""
    words = re.findall(r"[a-z]+", caption.lower())
    return {name: next((w for w in words if w in options), None) for name, options in ATTRIBUTES.items()}


def caption_of(query: dict[str, Any]) -> str:
    return query.get("caption") or query.get("prompt") or ""


def run_dirs(scores: Any) -> list[Path]:
    if OmegaConf.is_config(scores) or isinstance(scores, ListConfig):
        scores = OmegaConf.to_container(scores, resolve=True)
    if isinstance(scores, (str, Path)):
        scores = [scores]
    if not scores:
        raise ValueError(
            "benchmark=ranking_context needs scores='[<attribute.py run dir>, ...]' (runs on data=shapes or "
            "data=abc_embedded)."
        )
    dirs = [Path(s) for s in scores]
    for d in dirs:
        for name in ("scores.npy", "ranking.json", "config.yaml"):
            if not (d / name).is_file():
                raise FileNotFoundError(
                    f"{d / name} not found: every scores= entry must be an attribute.py run."
                )
    return dirs


def load_run(run_dir: Path) -> tuple[Any, np.ndarray, list[dict[str, Any]]]:
    """The run's datamodule (rebuilt from its config.yaml), scores [Q, N] and query records."""
    config = OmegaConf.load(run_dir / "config.yaml")
    datamodule = hydra.utils.instantiate(config.data)
    if not isinstance(datamodule, ShapesDataModule) and not hasattr(datamodule, "exemplar_ids"):
        raise ValueError(
            f"{run_dir} is not a run on data=shapes or data=abc_embedded: this analysis reads the embedded world."
        )
    queries = json.loads((run_dir / "ranking.json").read_text())["queries"]
    return datamodule, np.load(run_dir / "scores.npy"), queries


def exemplar_context(
    run_dir: Path, top: int, datamodule: Any, scores: np.ndarray, queries: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
    """An embedded-AbC run: how many of the exemplars in each top K are drawn on the query's
    background, against how many of the concept's exemplars are. (rows, table, run summary)"""
    source = datamodule.source
    rows, cells = [], []
    found = same = 0
    for q, query in enumerate(queries):
        background = caption_attributes(caption_of(query))["background"]
        relevant = np.asarray(query["relevant_ids"])
        ranked = np.argsort(-scores[q], kind="stable")[:top]
        hits = ranked[np.isin(ranked, relevant)].tolist()
        on_bg = sum(source.metadata(i).get("background") == background for i in hits)
        total_bg = sum(source.metadata(int(i)).get("background") == background for i in relevant)
        found, same = found + len(hits), same + on_bg
        rows.append(
            {
                "run": str(run_dir),
                "query": q,
                "caption": caption_of(query),
                "exemplars_in_top": len(hits),
                "on_query_background": on_bg,
                "exemplars_on_query_background": total_bg,
                "num_exemplars": len(relevant),
            }
        )
        cells.append([caption_of(query), len(hits), on_bg, f"{total_bg} of {len(relevant)}"])
    cells.append(["**all queries**", found, same, ""])
    table = report.markdown_table(
        ["query", "exemplars in top K", "of them on the query's background", "exemplars on it (of all)"],
        cells,
    )
    summary = {
        "run": str(run_dir),
        "kind": "exemplars",
        "exemplars_in_top": found,
        "on_query_background": same,
        "relevant_share": found / max(1, top * len(queries)),
    }
    return rows, table, summary


def concept_context(
    run_dir: Path, top: int, datamodule: Any, scores: np.ndarray, queries: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
    """A run on the embedded world: the top K by concept, and the context the images of another
    concept share with the query, against the base rates. (rows, table, run summary)"""
    source = datamodule.source
    meta = [source.metadata(i) for i in range(len(source))]
    concepts = concept_index(datamodule)
    rare_ids = np.concatenate(list(concepts.values()))
    base = {
        name: {v: np.mean([m.get(name) == v for m in meta]) for v in options}
        for name, options in ATTRIBUTES.items()
    }
    rows, cells = [], []
    totals = {"asked": 0, "other": 0, "plain": 0}
    shared = {name: [0, 0.0] for name in ATTRIBUTES}  # count sharing, expected count at base rate
    for q, query in enumerate(queries):
        context = caption_attributes(caption_of(query))
        wanted = relevant_ids_for({"caption": caption_of(query), **query}, concepts)
        wanted = np.empty(0, dtype=np.int64) if wanted is None else wanted
        ranked = np.argsort(-scores[q], kind="stable")[:top]
        own = ranked[np.isin(ranked, wanted)]
        other = ranked[np.isin(ranked, rare_ids) & ~np.isin(ranked, wanted)].tolist()
        plain = top - len(own) - len(other)
        totals["asked"] += len(own)
        totals["other"] += len(other)
        totals["plain"] += plain
        same_counts = {}
        for name in ATTRIBUTES:
            same_counts[name] = sum(meta[i].get(name) == context[name] for i in other)
            shared[name][0] += same_counts[name]
            shared[name][1] += len(other) * base[name].get(context[name], 0.0)
        rows.append(
            {
                "run": str(run_dir),
                "query": q,
                "caption": caption_of(query),
                "asked_concept": len(own),
                "other_concept": len(other),
                "plain": plain,
                **{f"other_same_{name}": same_counts[name] for name in ATTRIBUTES},
            }
        )
        cells.append(
            [
                caption_of(query),
                len(own),
                len(other),
                plain,
                *(f"{same_counts[n]} / {len(other)}" for n in ATTRIBUTES),
            ]
        )
    total_other = max(totals["other"], 1)
    cells.append(
        [
            "**all queries**",
            totals["asked"],
            totals["other"],
            totals["plain"],
            *(
                f"{shared[n][0] / total_other:.0%} (base {shared[n][1] / total_other:.0%})"
                for n in ATTRIBUTES
            ),
        ]
    )
    table = report.markdown_table(
        [
            "query",
            "asked concept",
            "other concept",
            "plain",
            "others: same colour",
            "same shape",
            "same background",
        ],
        cells,
    )
    summary = {
        "run": str(run_dir),
        "kind": "concepts",
        **{f"{key}_in_top": value for key, value in totals.items()},
        **{f"other_same_{n}_rate": shared[n][0] / total_other for n in ATTRIBUTES},
        **{f"other_same_{n}_base_rate": shared[n][1] / total_other for n in ATTRIBUTES},
        "relevant_share": totals["asked"] / max(1, top * len(queries)),
    }
    return rows, table, summary


def context_table(run_dir: Path, top: int) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
    """One run's per-query rows, its markdown table and its summary."""
    datamodule, scores, queries = load_run(run_dir)
    if hasattr(datamodule, "exemplar_ids"):  # data=abc_embedded
        return exemplar_context(run_dir, top, datamodule, scores, queries)
    return concept_context(run_dir, top, datamodule, scores, queries)


def run_ranking_context_benchmark(
    cfg: DictConfig, run_dir: str | Path, scores: Any = None, top: int = 20
) -> dict[str, Any]:
    run_dir = Path(run_dir)
    top = int(top)
    all_rows: list[dict[str, Any]] = []
    sections, runs = [], []
    for d in run_dirs(scores):
        rows, table, summary = context_table(d, top)
        all_rows += rows
        runs.append(summary)
        sections.append(f"{d} (top {top})\n\n{table}\n")
    text = "\n".join(sections)
    report.write_text(run_dir / "ranking_context.md", text)
    report.write_csv(
        run_dir / "ranking_context.csv",
        all_rows,
        fieldnames=list(dict.fromkeys(k for r in all_rows for k in r)),
    )
    result = {"top": top, "runs": runs}
    report.with_headline(result, "relevant_share", runs[0]["relevant_share"])
    report.write_json(run_dir / "metrics.json", result)
    report.log_to_wandb(cfg.get("logger"), tables={"ranking_context/runs": runs})
    print(text)
    return result
