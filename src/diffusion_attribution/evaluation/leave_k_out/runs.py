"""The inputs of leave-K-out and LDS: attribute.py run directories (scores.npy, ranking.json and the
saved query latents) of one model and the same queries, and the models they are measured on."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from diffusion_attribution.evaluation.retrieval import (
    AttributionRunError,
    check_same_model,
    read_ranking,
    read_scores,
)
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.utils.fingerprint import hash_json, model_fingerprint

RANDOM_BASELINE = "random"


class LeaveKOutError(ValueError):
    """Inputs the benchmark cannot evaluate; the message says how to fix them."""


@dataclass
class AttributionRun:
    """One attribute.py run directory: its scores, query records and the model it attributed."""

    path: Path
    method: str
    scores: np.ndarray  # [num_queries, num_train]
    ranking: dict[str, Any]

    @property
    def queries(self) -> list[dict[str, Any]]:
        return self.ranking["queries"]

    @property
    def model_fingerprint(self) -> str | None:
        """The attributed model's weights' fingerprint (None: a run written before it was recorded)."""
        return self.ranking.get("model_fingerprint")

    @property
    def data_fingerprint(self) -> str | None:
        return self.ranking.get("data_fingerprint")


def query_identity(record: dict[str, Any]) -> dict[str, Any]:
    """What makes two query records the same query (prompt + seed + sampler, or image + caption)."""
    keys = ("prompt", "seed", "sampler", "num_steps", "guidance_scale", "image", "caption", "box", "mask")
    return {k: record.get(k) for k in keys if record.get(k) is not None}


def load_attribution_runs(paths: Sequence[str | Path] | str | None) -> list[AttributionRun]:
    """Read every scores= run; they must attribute the same queries of the same model."""
    if paths is None or (isinstance(paths, str) and not paths.strip()):
        raise LeaveKOutError(
            "Give the attribution runs to evaluate: scores='[<attribute.py run dir>, ...]' (one per method, "
            "same model and queries)."
        )
    if isinstance(paths, (str, Path)):
        paths = [paths]
    runs: list[AttributionRun] = []
    for entry in paths:
        path = Path(entry)
        for name in ("scores.npy", "ranking.json"):
            if not (path / name).is_file():
                raise LeaveKOutError(
                    f"{path / name} not found: every scores= entry must be a run directory written by attribute.py."
                )
        try:  # a truncated file or one with NaN/inf is refused, naming the file and the fix
            ranking = read_ranking(path / "ranking.json")
            scores = read_scores(path / "scores.npy")
        except AttributionRunError as error:
            raise LeaveKOutError(str(error)) from None
        if scores.shape[0] != len(ranking["queries"]):
            raise LeaveKOutError(
                f"{path}: scores.npy has {scores.shape[0]} rows for {len(ranking['queries'])} queries."
            )
        runs.append(AttributionRun(path, str(ranking.get("method", path.name)), scores, ranking))
    # One model, however its path is spelled and whatever was saved at that path later: the recorded
    # fingerprints (runs written before they were recorded pass with a warning).
    try:
        check_same_model([run.ranking for run in runs], [run.path for run in runs])
    except AttributionRunError as error:
        raise LeaveKOutError(
            f"{error} Leave-K-out retrains one base model: evaluate runs of one model together."
        ) from None
    first = runs[0]
    for run in runs[1:]:
        if Path(str(run.ranking.get("model"))).resolve() != Path(str(first.ranking.get("model"))).resolve():
            raise LeaveKOutError(
                f"{run.path} attributed model {run.ranking.get('model')} but {first.path} attributed "
                f"{first.ranking.get('model')}: leave-K-out retrains one base model; evaluate runs of one model together."
            )
        if [query_identity(q) for q in run.queries] != [query_identity(q) for q in first.queries]:
            raise LeaveKOutError(
                f"{run.path} and {first.path} attribute different queries: run attribute.py with the same "
                "query.prompts/query.seeds (or query.file) for every method, so that methods are compared on "
                "the same queries."
            )
        if run.scores.shape != first.scores.shape:
            raise LeaveKOutError(
                f"{run.path} scores {run.scores.shape} but {first.path} scores {first.scores.shape}."
            )
    # Distinct names: a second run of a method (other settings) is told apart by its folder name;
    # a per-query random *ranking* is not the built-in random-removal baseline.
    seen: dict[str, int] = {}
    for run in runs:
        if run.method == RANDOM_BASELINE:
            run.method = "random_ranking"
        seen[run.method] = seen.get(run.method, 0) + 1
        if seen[run.method] > 1:
            run.method = f"{run.method}@{run.path.name}"
    return runs


@dataclass
class EvalQuery:
    index: int
    caption: str
    latent: torch.Tensor  # what the query's loss is measured on (the sampler's final latent)
    image: torch.Tensor
    noise_key: int
    prompt: str | None = None
    seed: int | None = None
    sampler: dict[str, Any] = field(default_factory=dict)
    concept: str | None = None
    relevant: np.ndarray | None = None


def noise_key(identity: dict[str, Any]) -> int:
    return int(hash_json(identity), 16)


def query_concept(record: dict[str, Any], concepts: dict[str, np.ndarray]) -> str | None:
    if record.get("concept"):
        return str(record["concept"])
    words = set(re.findall(r"[a-z0-9]+", str(record.get("caption") or record.get("prompt") or "").lower()))
    named = [c for c in concepts if c.lower() in words]
    return named[0] if len(named) == 1 else None


def load_queries(run: AttributionRun, concepts: dict[str, np.ndarray]) -> list[EvalQuery]:
    """The queries of an attribution run with the latents attribute.py saved (queries/query_XXX)."""
    queries = []
    for k, record in enumerate(run.queries):
        path = run.path / "queries" / f"query_{k:03d}.safetensors"
        if not path.is_file():
            raise LeaveKOutError(f"{path} not found: attribute.py saves every query's latent there.")
        tensors = load_file(path)
        concept = query_concept(record, concepts)
        relevant = record.get("relevant_ids")
        queries.append(
            EvalQuery(
                index=k,
                caption=str(record.get("caption") or record.get("prompt")),
                latent=tensors["latent"],
                image=tensors["image"],
                noise_key=noise_key(query_identity(record)),
                prompt=record.get("prompt"),
                seed=None if record.get("seed") is None else int(record["seed"]),
                sampler={
                    "num_steps": int(record.get("num_steps", 30)),
                    "guidance_scale": float(record.get("guidance_scale", 3.0)),
                    "sampler": str(record.get("sampler", "ddim")),
                },
                concept=concept,
                relevant=np.asarray(relevant, dtype=np.int64)
                if relevant is not None
                else concepts.get(concept)
                if concept
                else None,
            )
        )
    return queries


def load_model(
    path: str | Path, attributed: AttributionRun | None = None, device: torch.device | str = "cpu"
) -> TextToImageModel:
    """The model at `path` on `device` (the job's, compute/devices.py); with `attributed`, it must be
    the model that run attributed (its recorded fingerprint), not another one saved at the same path
    since."""
    model = TextToImageModel.from_pretrained(path)
    if attributed is not None and attributed.model_fingerprint:
        found = model_fingerprint(model)
        if found != attributed.model_fingerprint:
            raise LeaveKOutError(
                f"{path} now holds another model (fingerprint {found}) than the one {attributed.path} attributed "
                f"({attributed.model_fingerprint}): it was overwritten since. Rerun attribute.py on the model "
                "now at that path, or point model.path at the attributed checkpoint."
            )
    return model.to(device).eval()
