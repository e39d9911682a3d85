"""Leave-K-out's figures: ΔL against K per method, and the query generated before and after removals."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffusion_attribution.evaluation.leave_k_out.metrics import Reference
from diffusion_attribution.evaluation.leave_k_out.runs import EvalQuery
from diffusion_attribution.evaluation.leave_k_out.summary import Summary
from diffusion_attribution.evaluation.report import line_plot
from diffusion_attribution.utils.images import titled_grid


def plot_delta_loss(summary: Summary, path: Path, metric: str = "delta_loss") -> Path:
    series = {}
    for method, per_k in summary.items():
        ks = sorted(per_k)
        series[method] = (ks, [per_k[k][metric]["mean"] for k in ks], [per_k[k][metric]["sem"] for k in ks])
    return line_plot(
        path,
        series,
        xlabel="K (training images removed)",
        ylabel="ΔL = L(ẑ, θ₋K) − L(ẑ, θ₀)",
        title="Leave-K-out: loss increase on the query (mean ± s.e.)",
        zero_line=True,
    )


def before_after_figure(
    path: Path,
    queries: list[EvalQuery],
    refs: dict[int, Reference],
    images: dict[tuple[int, str, int], torch.Tensor],
    summary: dict[str, Any],
    ks: Sequence[int],
    num_queries: int,
) -> Path | None:
    """Rows: a few queries; columns: θ₀'s image, then each method × K's retrained image (same seed)."""
    shown = [q for q in queries if refs[q.index].image is not None][:num_queries]
    if not shown:
        return None
    columns = [(m, k) for m in summary for k in ks]
    tiles, titles = [], []
    for q in shown:
        tiles.append(refs[q.index].image)
        titles.append(f"q{q.index} θ₀\n{q.caption[:28]}")
        for m, k in columns:
            image = images.get((q.index, m, k))
            tiles.append(image if image is not None else torch.ones_like(refs[q.index].image))
            titles.append(f"{m[:14]}\nK={k}")
    return titled_grid(
        torch.stack(tiles), titles, path, ncol=len(columns) + 1,
        suptitle="the query generated before (θ₀) and after removing each method's top-K (same prompt, seed, noise)",
    )  # fmt: skip
