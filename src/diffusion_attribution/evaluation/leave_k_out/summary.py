"""Leave-K-out's statistics and tables: per method and K, each metric's mean ± standard error over
queries (the random draws averaged per query first), in the paper's units."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from diffusion_attribution.evaluation.leave_k_out.runs import RANDOM_BASELINE
from diffusion_attribution.evaluation.report import format_mean_sem, markdown_table, mean_and_sem

Summary = dict[str, dict[int, dict[str, Any]]]  # method -> K -> metric -> {mean, sem, n}

TABLE_METRICS = (  # column, scale, label (the paper's units), better
    ("delta_loss", 1e-3, "ΔL ×1e-3 (↑)"),
    ("dg_mse", 1e-2, "ΔG MSE ×1e-2 (↑)"),
    ("dg_clip", 1e-1, "ΔG CLIP ×1e-1 (↓)"),
    ("concept_kept", 1.0, "concept still drawn (↓)"),
    ("retention_delta_loss", 1e-3, "retention ΔL ×1e-3 (≈0)"),
    ("retention_dg_mse", 1e-2, "retention ΔG MSE ×1e-2 (≈0)"),
)


def summarise(rows: list[dict[str, Any]], metrics: Sequence[str]) -> Summary:
    """method -> K -> metric -> (mean, sem, n): draws averaged per query first, then over queries."""
    out: Summary = {}
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


def results_tables(summary: Summary, ks: Sequence[int]) -> str:
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
        rows = [
            [m, *(format_mean_sem(cells[(m, k)]["mean"], cells[(m, k)]["sem"], ".2f", scale) for k in ks)]
            for m in summary
        ]
        lines += [f"**{label}**", "", markdown_table(["method", *(f"K={k}" for k in ks)], rows), ""]
    return "\n".join(lines)


def ratio_lines(summary: Summary, ks: Sequence[int]) -> list[str]:
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


def headline(summary: Summary, ks: Sequence[int]) -> tuple[str, float | None]:
    """ΔL of the first method (not the random baseline) at the largest K: what a sweep optimises."""
    methods = [m for m in summary if m != RANDOM_BASELINE] or list(summary)
    if not methods or not ks:
        return "delta_loss", None
    k = max(ks)
    value = summary[methods[0]].get(k, {}).get("delta_loss", {}).get("mean")
    return f"delta_loss/{methods[0]}/k{k}", value
