"""Candidate rankers: a cheap per-query shortlist of training examples that an expensive method (the
unlearning attributor's after-unlearning sweep) then re-scores, as FastGDA restricts AbU+ to the DINO
nearest neighbours of each query.

    ranker = hydra.utils.instantiate(cfg.method.candidates)   # conf/method/candidates/<name>.yaml
    ranker.prepare(model, datamodule, context, pool, identity)  # checks first, then train-side work
    ranker.shortlists(queries) -> [sorted ids of each query's shortlist]

`k` is a count (an int ≥ 1) or a fraction of the pool (a float in (0, 1]: ceil(k · pool size)); the
pool is every training example, or the run's `score_ids`. A shortlist holds the k pool ids the
ranker scores highest (ties broken by id). Settings are checked when the config is read (k's form)
and in `prepare` before any train-side work (k against the pool, a scores run's model).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from diffusion_attribution.attribution.base import AttributionContext
from diffusion_attribution.attribution.queries import Query
from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.models.pipeline import TextToImageModel

KEY = "method.candidates"
OPTIONS = "none|features|captions|scores|union"


class CandidateError(ValueError):
    """A candidate setting that cannot work; the message names the key and the fix."""


def check_k_form(k: Any, key: str = KEY) -> int | float:
    """k as given in the config: an int ≥ 1 (a count) or a float in (0, 1] (a fraction of the pool)."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise CandidateError(
            f"{key}.k={k!r} must be a count (an integer ≥ 1, e.g. 10000) or a fraction of the training "
            "examples (a number in (0, 1], e.g. 0.1)."
        )
    if isinstance(k, float) and k.is_integer() and k > 1:
        k = int(k)  # 500.0 from a YAML or a sweep: the count 500
    if not k > 0:
        raise CandidateError(
            f"{key}.k={k} must be positive: a count ≥ 1 or a fraction in (0, 1] of the examples "
            f"(or {KEY.replace('.', '/')}=none to score every example)."
        )
    if isinstance(k, float) and k > 1:
        raise CandidateError(
            f"{key}.k={k} is a fraction above 1: give a fraction in (0, 1] of the examples, or an integer count."
        )
    return k


def resolve_k(k: int | float, pool_size: int, key: str = KEY) -> int:
    """The shortlist length for a pool of `pool_size` ids; a count above the pool is refused."""
    if isinstance(k, float):
        return max(1, min(pool_size, math.ceil(k * pool_size - 1e-9)))
    if k > pool_size:
        raise CandidateError(
            f"{key}.k={k} is above the {pool_size} examples this run scores: give k ≤ {pool_size}, a "
            f"fraction in (0, 1] (k=1.0 keeps them all), or {KEY.replace('.', '/')}=none."
        )
    return int(k)


def top_ids(similarity: np.ndarray, pool: np.ndarray, count: int) -> np.ndarray:
    """The `count` ids of `pool` with the highest similarity (ties by id), sorted by id."""
    values = np.asarray(similarity, dtype=np.float64)[pool]
    values = np.where(np.isnan(values), -np.inf, values)
    order = np.argsort(-values, kind="stable")[:count]
    return np.sort(pool[order])


class CandidateRanker(ABC):
    """One way to shortlist training examples per query. Subclasses give `similarity` (higher = more
    likely relevant), `settings` and, where train-side work is needed, `_prepare`."""

    name = "ranker"
    everything = False  # True: no shortlist, every example is scored (candidates=none)

    def __init__(self, k: int | float = 0.1) -> None:
        self.key = KEY  # the config path messages name (a union's members get theirs)
        self.k = check_k_form(k, self.key)

    # ------------------------------------------------------------------------------ setup
    def check(
        self,
        model: TextToImageModel,
        datamodule: CaptionedImageDataModule,
        pool: np.ndarray,
        identity: dict[str, Any],
    ) -> None:
        """Everything that can be refused without work: k against the pool, and the ranker's own checks."""
        self.pool = np.asarray(pool, dtype=np.int64)
        self.count = resolve_k(self.k, len(self.pool), self.key)

    def prepare(
        self,
        model: TextToImageModel,
        datamodule: CaptionedImageDataModule,
        context: AttributionContext,
        pool: np.ndarray,
        identity: dict[str, Any],
    ) -> None:
        """`check`, then the train-side work (cached under context.cache_dir where it costs)."""
        self.check(model, datamodule, pool, identity)
        self._prepare(model, datamodule, context, identity)

    def _prepare(  # noqa: B027 - optional: rankers without train-side work keep it empty
        self,
        model: TextToImageModel,
        datamodule: CaptionedImageDataModule,
        context: AttributionContext,
        identity: dict[str, Any],
    ) -> None:
        """Train-side work; none by default."""

    # ------------------------------------------------------------------------------ ranking
    @abstractmethod
    def similarity(self, queries: list[Query]) -> np.ndarray:
        """[len(queries), num_examples], higher = ranked earlier."""

    def shortlists(self, queries: list[Query]) -> list[np.ndarray]:
        """Each query's shortlist: `count` ids of the pool, sorted by id."""
        similarity = self.similarity(queries)
        return [top_ids(row, self.pool, self.count) for row in similarity]

    def settings(self) -> dict[str, Any]:
        """What ranking.json records about the ranker."""
        return {"ranker": self.name, "k": self.k, "count": getattr(self, "count", None)}

    def train_side_paths(self) -> list[Any]:
        return []
