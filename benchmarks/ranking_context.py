"""What a ranking's top K shares with its query besides the concept: colour, shape, background.

    python benchmarks/ranking_context.py <attribute run dir> [<run dir> ...] [--top 20]

For every query of an attribute.py run on the embedded world (data=shapes), reads the query's colour,
shape and background from its caption and counts, among the top K training images, those of the asked
concept, of another rare concept and plain ones; then, for the images of another concept, how often
they share the query's colour, shape and background, against the rate over the whole training set.
A ranking that finds "rare images drawn like the query" rather than "images of the query's concept"
shows same-context rates far above the base rates (issue 4: why mAP stays below the goal).

On an embedded-AbC run (data=abc_embedded) it counts, per query, the exemplars in the top K and how
many of them are drawn on the query's background (issue 7: object queries find the exemplars that share
the query's background and miss the others).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from diffusion_attribution.data.shapes import BACKGROUNDS, COLOURS, SHAPES  # noqa: E402
from diffusion_attribution.evaluation.retrieval import concept_index, relevant_ids_for  # noqa: E402

ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "background": tuple(BACKGROUNDS)}


def caption_attributes(caption: str) -> dict[str, str | None]:
    """The colour, shape and background words of a world caption (None when absent). The world's
    object colours, shapes and backgrounds are disjoint word sets, so the first match of each is it."""
    words = re.findall(r"[a-z]+", caption.lower())
    return {name: next((w for w in words if w in options), None) for name, options in ATTRIBUTES.items()}


def load_run(run_dir: Path) -> tuple[Any, np.ndarray, list[dict[str, Any]]]:
    """The run's datamodule (rebuilt from its config.yaml), scores [Q, N] and query records."""
    config = OmegaConf.load(run_dir / "config.yaml")
    target = str(config.data.get("_target_"))
    if "ShapesDataModule" not in target and "AbcEmbeddedDataModule" not in target:
        raise SystemExit(
            f"{run_dir} is not a run on data=shapes or data=abc_embedded: this analysis reads the embedded world."
        )
    queries = json.loads((run_dir / "ranking.json").read_text())["queries"]
    return instantiate(config.data), np.load(run_dir / "scores.npy"), queries


def caption_of(query: dict[str, Any]) -> str:
    return query.get("caption") or query.get("prompt") or ""


def exemplar_context_table(
    run_dir: Path, top: int, datamodule: Any, scores: np.ndarray, queries: list[dict[str, Any]]
) -> list[str]:
    """An embedded-AbC run (data=abc_embedded): how many of the exemplars in each top K are drawn on
    the query's background, against how many of the concept's exemplars are."""
    source = datamodule.source
    lines = [
        f"{run_dir} (top {top})",
        "",
        "| query | exemplars in top K | of them on the query's background | exemplars on it (of all) |",
        "|---|---|---|---|",
    ]
    found = same = 0
    for q, query in enumerate(queries):
        background = caption_attributes(caption_of(query))["background"]
        relevant = np.asarray(query["relevant_ids"])
        ranked = np.argsort(-scores[q], kind="stable")[:top]
        hits = ranked[np.isin(ranked, relevant)].tolist()
        on_bg = sum(source.metadata(i).get("background") == background for i in hits)
        total_bg = sum(source.metadata(int(i)).get("background") == background for i in relevant)
        found, same = found + len(hits), same + on_bg
        lines.append(f"| {caption_of(query)} | {len(hits)} | {on_bg} | {total_bg} of {len(relevant)} |")
    lines.append(f"| **all queries** | {found} | {same} | |")
    return lines


def context_table(run_dir: Path, top: int) -> list[str]:
    """A run on the embedded world (data=shapes): the top K by concept, and the context the images of
    another concept share with the query, against the base rates."""
    datamodule, scores, queries = load_run(run_dir)
    if hasattr(datamodule, "exemplar_ids"):  # data=abc_embedded
        return exemplar_context_table(run_dir, top, datamodule, scores, queries)
    source = datamodule.source
    meta = [source.metadata(i) for i in range(len(source))]
    concepts = concept_index(datamodule)
    rare_ids = np.concatenate(list(concepts.values()))
    base = {
        name: {v: np.mean([m.get(name) == v for m in meta]) for v in options}
        for name, options in ATTRIBUTES.items()
    }
    lines = [
        f"{run_dir} (top {top})",
        "",
        "| query | asked concept | other concept | plain | others: same colour | same shape | same background |",
        "|---|---|---|---|---|---|---|",
    ]
    totals = {"asked": 0, "other": 0, "plain": 0}
    shared = {name: [0, 0.0] for name in ATTRIBUTES}  # count sharing, expected count at base rate
    for q, query in enumerate(queries):
        context = caption_attributes(caption_of(query))
        wanted = relevant_ids_for({"caption": caption_of(query), **query}, concepts)
        wanted = np.empty(0, dtype=np.int64) if wanted is None else wanted
        ranked = np.argsort(-scores[q], kind="stable")[:top]
        own = ranked[np.isin(ranked, wanted)]
        other = ranked[np.isin(ranked, rare_ids) & ~np.isin(ranked, wanted)].tolist()
        totals["asked"] += len(own)
        totals["other"] += len(other)
        totals["plain"] += top - len(own) - len(other)
        cells = []
        for name in ATTRIBUTES:
            same = sum(meta[i].get(name) == context[name] for i in other)
            shared[name][0] += same
            shared[name][1] += len(other) * base[name].get(context[name], 0.0)
            cells.append(f"{same} / {len(other)}")
        lines.append(
            f"| {caption_of(query)} | {len(own)} | {len(other)} | {top - len(own) - len(other)} | "
            + " | ".join(cells)
            + " |"
        )
    total_other = max(totals["other"], 1)
    lines.append(
        f"| **all queries** | {totals['asked']} | {totals['other']} | {totals['plain']} | "
        + " | ".join(
            f"{shared[n][0] / total_other:.0%} (base {shared[n][1] / total_other:.0%})" for n in ATTRIBUTES
        )
        + " |"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="attribute.py run directories")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    for run_dir in args.runs:
        print("\n".join(context_table(run_dir, args.top)) + "\n")


if __name__ == "__main__":
    main()
