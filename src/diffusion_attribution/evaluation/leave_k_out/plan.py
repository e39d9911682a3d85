"""The retrains leave-K-out asks for: each method's top K per query, and the random-removal sets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from diffusion_attribution.evaluation.leave_k_out.runs import RANDOM_BASELINE, AttributionRun, LeaveKOutError
from diffusion_attribution.evaluation.retraining import RetrainPlan, random_exclusion

LEAVE_K_OUT_RANDOM = 1  # random_exclusion keys: (1, K, draw) here, (2, subset) in LDS


def plan_leave_k_out(
    runs: Sequence[AttributionRun],
    plan: RetrainPlan,
    ks: Sequence[int],
    random_draws: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Request every (query, method, K) retrain and the random-removal sets; return the evaluation
    list: one entry per (query or all queries, method, K, draw) with its RetrainJob."""
    num_train = runs[0].scores.shape[1]
    entries: list[dict[str, Any]] = []
    for k in ks:
        if not 0 < k < num_train:
            raise LeaveKOutError(f"benchmark.k has {k}: each K must be between 1 and {num_train - 1}.")
        for run in runs:
            for q in range(run.scores.shape[0]):
                top = np.argsort(-run.scores[q], kind="stable")[:k]
                job = plan.request(top, query=q, method=run.method, k=k)
                entries.append(
                    {"query": q, "method": run.method, "k": k, "draw": 0, "job": job, "removed": top}
                )
        for draw in range(random_draws):
            ids = random_exclusion(num_train, k, seed, LEAVE_K_OUT_RANDOM, k, draw)
            job = plan.request(ids, method=RANDOM_BASELINE, k=k, draw=draw)
            entries.append(
                {"query": None, "method": RANDOM_BASELINE, "k": k, "draw": draw, "job": job, "removed": ids}
            )
    return entries
