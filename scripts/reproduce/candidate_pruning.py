"""What candidate pruning costs: a finished unlearning run replayed with per-query shortlists.

    python scripts/reproduce/candidate_pruning.py <full attribute run dir> [<another> ...]
        [--rankers pixel captions] [--fractions 0.05 0.1 0.25] [--out DIR] [-- extra attribute.py overrides]

The full run is any `attribute.py method=unlearning|unlearning_ekfac` run whose queries carry ground
truth (its metrics.json holds their mAP). Each (ranker, k) replays its command (the run's own Hydra
overrides, the same cache_dir, so the curvature and the before-sweep are reused) with
`method/candidates=<ranker> method.candidates.k=<k>`, then reads back what attribute.py wrote:
- mAP and Recall@10 (metrics.json) against the full run's;
- the recall of the full run's top 100 inside each query's shortlist (ranking.json records it);
- the after-unlearning sweep seconds per query (ranking.json diagnostics) and the speed-up.
Writes pruning.md, pruning.csv and pruning.png (quality against sweep time) under --out. Several full
runs (e.g. the embedded AbC benchmark's, one per concept and customized model) are replayed each into
<out>/<run folder name>/, and the table holds the mean over runs (equal query counts: the mean over
queries); `evaluate.py benchmark=abc scores=[<full runs>,<out>]` then splits it by concept type.
Rankers: pixel, clip, dino, dinov2 (method/candidates=features with that backbone; the last three need
method.candidates.backbone.path after --) and captions (the model's own text encoder).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from diffusion_attribution.evaluation import report
from diffusion_attribution.jobs.commands import run_project_command

ROOT = Path(__file__).resolve().parents[2]
BACKBONES = ("pixel", "clip", "dino", "dinov2")


def ranker_overrides(ranker: str, k: float) -> list[str]:
    if ranker == "captions":
        return ["method/candidates=captions", f"method.candidates.k={k}"]
    if ranker in BACKBONES:
        return [
            "method/candidates=features",
            f"method.candidates.k={k}",
            f"method.candidates.backbone.name={ranker}",
        ]
    raise SystemExit(f"Unknown ranker {ranker!r}: use captions or one of {BACKBONES}.")


def shortlist_ids(diagnostics: dict[str, Any], run_dir: Path) -> np.ndarray:
    candidates = diagnostics["candidates"]
    if candidates.get("ids") is not None:
        return np.asarray(candidates["ids"], dtype=np.int64)
    path = Path(candidates["ids_file"])
    return np.load(path if path.is_absolute() else run_dir / path)


def summarise(run_dir: Path, full_scores: np.ndarray | None = None) -> dict[str, Any]:
    """mAP, R@10, mean after-sweep seconds per query and (pruned runs) the recall of the full top 100."""
    ranking = json.loads((run_dir / "ranking.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    diagnostics = [q.get("diagnostics", {}) for q in ranking["queries"]]
    row = {
        "map": metrics["map"],
        "recall@10": metrics["recall@10"],
        "sweep_after_s": float(np.mean([d.get("sweep_after_s", np.nan) for d in diagnostics])),
    }
    if full_scores is not None:
        recalls, sizes = [], []
        for k, d in enumerate(diagnostics):
            ids = shortlist_ids(d, run_dir)
            top = np.argsort(-full_scores[k], kind="stable")[:100]
            recalls.append(len(np.intersect1d(top, ids)) / len(top))
            sizes.append(len(ids))
        row["full_top100_in_shortlist"] = float(np.mean(recalls))
        row["shortlist"] = int(np.mean(sizes))
    return row


def full_row(full: Path) -> dict:
    if not (full / "metrics.json").is_file():
        raise SystemExit(
            f"{full} has no metrics.json: give a finished attribute.py run whose queries carry ground truth."
        )
    return {"ranker": "none (full)", "k": 1.0, **summarise(full), "full_top100_in_shortlist": 1.0}


def pruned_row(full: Path, run_dir: Path, ranker: str, fraction: float, extra: list[str]) -> dict:
    """The full run's command replayed with a shortlist of `ranker` at k = `fraction` into run_dir
    (kept if it finished before), and its row."""
    overrides = yaml.safe_load((full / ".hydra" / "overrides.yaml").read_text())
    overrides = [
        o
        for o in overrides
        if not o.startswith(("hydra.run.dir=", "method/candidates=", "method.candidates."))
    ]
    command = [
        "attribute.py",
        *overrides,
        *ranker_overrides(ranker, fraction),
        *extra,
        f"hydra.run.dir={run_dir}",
    ]
    run_project_command(
        command, ROOT, log_file=run_dir.parent / f"{run_dir.name}.log", done=run_dir / "metrics.json"
    )
    return {"ranker": ranker, "k": fraction, **summarise(run_dir, np.load(full / "scores.npy"))}


def mean_rows(per_run: list[list[dict]]) -> list[dict]:
    """Row by row (same rankers and k in every run), the mean of each number over the runs."""
    rows = []
    for group in zip(*per_run, strict=True):
        row = dict(group[0])
        for key, value in group[0].items():
            if isinstance(value, (int, float)) and key != "k":
                row[key] = float(np.mean([r[key] for r in group]))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("full_runs", type=Path, nargs="+")
    parser.add_argument("--rankers", nargs="+", default=["pixel", "captions"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.05, 0.1, 0.25])
    parser.add_argument("--out", type=Path, default=None)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    extra = argv[split + 1 :]
    fulls = [f.resolve() for f in args.full_runs]
    names = [f.name for f in fulls]
    if len(set(names)) < len(names):
        raise SystemExit(f"The full runs' folder names must differ (they name the output folders): {names}.")
    out = (args.out or ROOT / "outputs" / "candidate_pruning" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Setting by setting over every run (not run by run), so the first settings finish for all runs first.
    per_run = [[full_row(f)] for f in fulls]
    for ranker in args.rankers:
        for fraction in args.fractions:
            for full, rows in zip(fulls, per_run, strict=True):
                folder = out if len(fulls) == 1 else out / full.name
                rows.append(pruned_row(full, folder / f"{ranker}_{fraction:g}", ranker, fraction, extra))
    rows = mean_rows(per_run)
    base = rows[0]
    for row in rows:
        row["map_vs_full"] = row["map"] - base["map"]
        row["speedup"] = (
            base["sweep_after_s"] / row["sweep_after_s"] if row["sweep_after_s"] > 0 else float("nan")
        )
    columns = [
        "ranker",
        "k",
        "map",
        "map_vs_full",
        "recall@10",
        "full_top100_in_shortlist",
        "sweep_after_s",
        "speedup",
    ]
    table = [
        [f"{r.get(c):.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
        for r in rows
    ]
    report.write_text(out / "pruning.md", report.markdown_table(columns, table) + "\n")
    report.write_csv(out / "pruning.csv", rows, fieldnames=columns + ["shortlist"])
    series = {
        ranker: (
            [r["sweep_after_s"] for r in rows if r["ranker"] == ranker],
            [r["map"] for r in rows if r["ranker"] == ranker],
            None,
        )
        for ranker in args.rankers
    }
    series["full"] = ([base["sweep_after_s"]], [base["map"]], None)
    report.line_plot(
        out / "pruning.png",
        series,
        "after-unlearning sweep s per query",
        "mAP",
        title="pruning: quality vs time",
    )
    print((out / "pruning.md").read_text())
    print(f"Results: {out}")


if __name__ == "__main__":
    main()
