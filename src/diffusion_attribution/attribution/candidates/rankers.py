"""The candidate rankers of `method/candidates=none|features|captions|scores|union` (one class per
config file under conf/method/candidates/)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion_attribution.attribution.base import AttributionContext
from diffusion_attribution.attribution.candidates.base import KEY, CandidateError, CandidateRanker
from diffusion_attribution.attribution.features import FeatureAttributor
from diffusion_attribution.attribution.queries import Query
from diffusion_attribution.compute.sharded import run_sharded
from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.models.backbones import BackboneError
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.utils.fingerprint import hash_json

log = logging.getLogger(__name__)


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    return (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(torch.float32)


def _max_per_example(per_caption: torch.Tensor, owners: torch.Tensor, num_examples: int) -> torch.Tensor:
    """[queries, captions] -> [queries, examples]: each example's best caption (−inf with none)."""
    out = torch.full((per_caption.shape[0], num_examples), -torch.inf)
    index = owners.expand(per_caption.shape[0], -1)
    return out.scatter_reduce(1, index, per_caption, reduce="amax", include_self=True)


class AllExamples(CandidateRanker):
    """`method/candidates=none`: no shortlist; every example is swept after unlearning (the default)."""

    name = "none"
    everything = True

    def __init__(self) -> None:
        self.key = KEY
        self.k = 1.0

    def similarity(self, queries: list[Query]) -> np.ndarray:
        return np.zeros((len(queries), len(self.pool)), dtype=np.float32)

    def settings(self) -> dict[str, Any]:
        return {"ranker": self.name}


class FeatureRanker(CandidateRanker):
    """`features`: cosine similarity of the query image to every training image under a feature
    backbone (pixel|clip|dino|dinov2; FastGDA: DINO), through `method=features`' FeatureAttributor, so
    the training-side features are cached under cache_dir and shared with that baseline."""

    name = "features"

    def __init__(
        self,
        k: int | float = 0.1,
        backbone: str | Mapping[str, Any] = "dino",
        batch_size: int = 64,
        shard_size: int = 1024,
        store: str | None = None,
    ) -> None:
        super().__init__(k)
        try:
            self.features = FeatureAttributor(
                backbone, batch_size=batch_size, shard_size=shard_size, store=store
            )
        except BackboneError as error:  # its messages say backbone.path: here it lives under the ranker
            raise CandidateError(f"{self.key}.backbone: {error}") from error

    def _prepare(
        self,
        model: TextToImageModel,
        datamodule: CaptionedImageDataModule,
        context: AttributionContext,
        identity: dict[str, Any],
    ) -> None:
        self.features.prepare(model, datamodule, context)

    def similarity(self, queries: list[Query]) -> np.ndarray:
        return self.features.score(queries)

    def settings(self) -> dict[str, Any]:
        config = self.features.config()
        return {
            **super().settings(),
            "backbone": config["backbone"],
            "path": config["path"],
            "weights": config["weights"],
        }

    def train_side_paths(self) -> list[Any]:
        return [self.features.store_dir] if hasattr(self.features, "store_dir") else []


class CaptionRanker(CandidateRanker):
    """`captions`: cosine similarity of the query's caption to the training captions through the
    diffusion model's own text encoder (its final hidden states, mean-pooled over the caption's tokens,
    padding left out). An example with several captions takes its best one. Training-side embeddings
    are cached under cache_dir/candidates/ keyed by the model and data."""

    name = "captions"

    def __init__(self, k: int | float = 0.1, batch_size: int = 256, shard_size: int = 4096) -> None:
        super().__init__(k)
        self.batch_size = int(batch_size)
        self.shard_size = int(shard_size)

    def embed(self, captions: list[str]) -> torch.Tensor:
        """Unit-normalised mean-pooled text states [len(captions), D] (CPU)."""
        model = self.model
        out = []
        for start in range(0, len(captions), self.batch_size):
            chunk = list(captions[start : start + self.batch_size])
            input_ids = model.tokenize(chunk)
            pad = model.tokenizer.pad_token_id
            tokens = model.tokenizer(
                chunk, padding="max_length", truncation=True, max_length=model.max_length, return_tensors="pt"
            )
            mask = tokens.get("attention_mask")
            if mask is None:
                mask = (
                    (tokens.input_ids != pad).long() if pad is not None else torch.ones_like(tokens.input_ids)
                )
            mask = mask.to(input_ids.device, torch.float32)[..., None]
            with torch.no_grad():
                states = model.encode_text(input_ids).float()
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
            out.append(_unit(pooled.cpu()))
        return torch.cat(out)

    def _prepare(
        self,
        model: TextToImageModel,
        datamodule: CaptionedImageDataModule,
        context: AttributionContext,
        identity: dict[str, Any],
    ) -> None:
        self.model = model
        self.num_examples = datamodule.num_examples
        source = datamodule.source
        store_identity = {"model": identity["model"], "data": identity["data"], "pooling": "mean"}
        self.store_dir = (
            context.cache_dir / "candidates" / f"captions-{hash_json([store_identity, self.shard_size])}"
        )

        def shard_fn(ids: np.ndarray) -> dict[str, torch.Tensor]:
            pairs = [(int(i), c) for i in ids for c in source.captions(int(i))]
            return {
                "features": self.embed([c for _, c in pairs]),
                "ids": torch.tensor([i for i, _ in pairs], dtype=torch.int64),
            }

        shards = run_sharded(
            model,
            shard_fn,
            np.arange(self.num_examples),
            self.store_dir,
            store_identity,
            shard_size=self.shard_size,
            trainer_kwargs=context.trainer_kwargs,
            description="text-encoder embeddings of the training captions",
        )
        self.train_features = torch.cat([s["features"] for s in shards])
        self.owners = torch.cat([s["ids"] for s in shards])

    def similarity(self, queries: list[Query]) -> np.ndarray:
        q = self.embed([query.caption for query in queries])
        return _max_per_example(q @ self.train_features.T, self.owners, self.num_examples).numpy()

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "encoder": "model text encoder", "pooling": "mean", "captions": "max"}

    def train_side_paths(self) -> list[Any]:
        return [self.store_dir] if hasattr(self, "store_dir") else []


class ScoresRanker(CandidateRanker):
    """`scores`: another attribution run's scores.npy (e.g. D-TRAK's) as the ranking. `run` is that
    run's directory (scores.npy + ranking.json). The run must be of this model and data: its
    ranking.json's model fingerprint where it records one, else its `model` path (against this run's
    `model_path`, ${model.path} in the config) and its `num_examples`; and it must hold this run's
    queries in this order (same count, same captions)."""

    name = "scores"

    def __init__(self, k: int | float = 0.1, run: str | None = None, model_path: str | None = None) -> None:
        super().__init__(k)
        if not run:
            raise CandidateError(
                f"{self.key}.run is not set: give the directory of an attribution run of this model with "
                f"these queries (its scores.npy and ranking.json), e.g. {self.key}.run=outputs/dtrak."
            )
        self.run = Path(str(run)).expanduser()
        self.model_path = None if model_path in (None, "") else str(model_path)
        missing = [n for n in ("scores.npy", "ranking.json") if not (self.run / n).is_file()]
        if missing:
            raise CandidateError(
                f"{self.key}.run={self.run} holds no {' or '.join(missing)}: point it at the directory of a "
                "finished attribution run (python attribute.py ... writes both)."
            )
        self.ranking = json.loads((self.run / "ranking.json").read_text())

    @staticmethod
    def _recorded_fingerprint(ranking: dict[str, Any]) -> str | None:
        for holder in (ranking, ranking.get("method_config") or {}):
            for key in ("model_fingerprint", "model_sha"):
                if holder.get(key):
                    return str(holder[key])
            identity = holder.get("identity")
            if isinstance(identity, dict) and identity.get("model"):
                return str(identity["model"])
        return None

    def check(
        self,
        model: TextToImageModel,
        datamodule: CaptionedImageDataModule,
        pool: np.ndarray,
        identity: dict[str, Any],
    ) -> None:
        super().check(model, datamodule, pool, identity)
        ranking, where = self.ranking, f"{self.key}.run={self.run}"
        fix = f"Give {self.key}.run a run of this model on this data, or another ranker."
        recorded = self._recorded_fingerprint(ranking)
        if recorded is not None and recorded != identity["model"]:
            raise CandidateError(
                f"{where} scored another model (weights fingerprint {recorded}, this model's is "
                f"{identity['model']}). {fix}"
            )
        num = ranking.get("num_examples")
        if num is not None and int(num) != datamodule.num_examples:
            raise CandidateError(
                f"{where} scored {num} training examples but this data has {datamodule.num_examples}. {fix}"
            )
        if recorded is None:
            theirs = ranking.get("model")
            if self.model_path is not None and theirs is not None:
                if Path(str(theirs)).expanduser().resolve() != Path(self.model_path).expanduser().resolve():
                    raise CandidateError(
                        f"{where} scored model {theirs}, not this run's {self.model_path}. {fix}"
                    )
            elif num is None:
                raise CandidateError(
                    f"{where}: its ranking.json records neither the model nor num_examples. {fix}"
                )
        self.scores = np.load(self.run / "scores.npy", mmap_mode="r")
        if self.scores.ndim != 2 or self.scores.shape[1] != datamodule.num_examples:
            raise CandidateError(
                f"{where}: scores.npy is {self.scores.shape}, not [queries, {datamodule.num_examples}]. {fix}"
            )

    def similarity(self, queries: list[Query]) -> np.ndarray:
        theirs = [q.get("caption") for q in self.ranking.get("queries", [])]
        ours = [q.caption for q in queries]
        if self.scores.shape[0] != len(queries) or (theirs and theirs != ours):
            raise CandidateError(
                f"{self.key}.run={self.run} scored {self.scores.shape[0]} queries {theirs} but this run has "
                f"{len(queries)} {ours}: the scores run must hold the same queries in the same order."
            )
        return np.asarray(self.scores, dtype=np.float32)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "run": str(self.run), "method": self.ranking.get("method")}


class UnionRanker(CandidateRanker):
    """`union`: the union of several rankers' shortlists, each with its own k (the shortlist then holds
    between max(k) and sum(k) ids). `rankers`: a mapping name -> ranker config (or a list)."""

    name = "union"

    def __init__(self, rankers: Mapping[str, Any] | Sequence[Any] | None = None) -> None:
        self.key = KEY
        self.k = None  # type: ignore[assignment]
        if isinstance(rankers, Mapping):
            named = [(str(name), ranker) for name, ranker in rankers.items() if ranker is not None]
        else:
            named = [(str(n), ranker) for n, ranker in enumerate(rankers or []) if ranker is not None]
        if not named:
            raise CandidateError(
                f"{KEY}.rankers is empty: give at least one ranker (features, captions or scores) to unite."
            )
        for name, ranker in named:
            if not isinstance(ranker, CandidateRanker) or isinstance(ranker, (AllExamples, UnionRanker)):
                raise CandidateError(
                    f"{KEY}.rankers.{name} must be a features, captions or scores ranker config (with its "
                    f"_target_), got {type(ranker).__name__}."
                )
            ranker.key = f"{KEY}.rankers.{name}"
        self.members = dict(named)

    def check(
        self,
        model: TextToImageModel,
        datamodule: CaptionedImageDataModule,
        pool: np.ndarray,
        identity: dict[str, Any],
    ) -> None:
        self.pool = np.asarray(pool, dtype=np.int64)
        for ranker in self.members.values():  # every member's checks before any member's work
            ranker.check(model, datamodule, pool, identity)
        self.count = None  # type: ignore[assignment]

    def _prepare(
        self,
        model: TextToImageModel,
        datamodule: CaptionedImageDataModule,
        context: AttributionContext,
        identity: dict[str, Any],
    ) -> None:
        for ranker in self.members.values():
            ranker._prepare(model, datamodule, context, identity)

    def similarity(self, queries: list[Query]) -> np.ndarray:
        raise NotImplementedError("A union has no single ranking; use shortlists().")

    def shortlists(self, queries: list[Query]) -> list[np.ndarray]:
        self.member_shortlists = {name: r.shortlists(queries) for name, r in self.members.items()}
        return [
            np.unique(np.concatenate([lists[q] for lists in self.member_shortlists.values()]))
            for q in range(len(queries))
        ]

    def settings(self) -> dict[str, Any]:
        return {"ranker": self.name, "members": {n: r.settings() for n, r in self.members.items()}}

    def train_side_paths(self) -> list[Any]:
        return [p for r in self.members.values() for p in r.train_side_paths()]
