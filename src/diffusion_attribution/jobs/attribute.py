"""The job behind attribute.py: check the method's settings, load the model and its training data,
build the queries, run the method (prepare once, score all queries), write the outputs
(attribution/outputs.py) and, when the queries carry ground truth, their retrieval metrics."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_attribution.attribution.base import AttributionContext, Attributor, mask_unscored
from diffusion_attribution.attribution.checks import (
    check_training_data,
    check_vocabulary,
    claim_run_dir,
    int_setting,
)
from diffusion_attribution.attribution.outputs import check_finite_scores, run_fingerprints, write_outputs
from diffusion_attribution.attribution.queries import build_queries
from diffusion_attribution.compute.devices import device_from_trainer
from diffusion_attribution.data.base import CaptionedImageDataModule, parse_id_list
from diffusion_attribution.evaluation.report import log_to_wandb
from diffusion_attribution.evaluation.retrieval import query_retrieval_metrics
from diffusion_attribution.models.loading import model_from_config

log = logging.getLogger(__name__)

# Trainer settings that matter for inference loops; the rest of a trainer config is about training.
INFERENCE_TRAINER_KEYS = (
    "accelerator",
    "devices",
    "strategy",
    "num_nodes",
    "precision",
    "enable_progress_bar",
)
METRICS_FILE = "metrics.json"


@dataclass
class AttributionResult:
    scores: np.ndarray  # [num_queries, num_examples]
    metrics: dict[str, Any] | None  # retrieval metrics when the queries carry ground truth

    @property
    def metric(self) -> float | None:
        """The headline metric a sweeper optimises: retrieval mAP (None without ground truth)."""
        return None if self.metrics is None else float(self.metrics["map"])


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    trainer_cfg = cfg.get("trainer")
    if not trainer_cfg:
        return {}
    keep = [k for k in INFERENCE_TRAINER_KEYS if k in trainer_cfg]
    return OmegaConf.to_container(OmegaConf.masked_copy(trainer_cfg, keep), resolve=True)  # type: ignore[return-value]


def inference_device(cfg: DictConfig) -> torch.device:
    """One device decision, from the trainer config (the sharded sweeps run on the same Trainer
    settings): compute/devices.py."""
    return device_from_trainer(cfg.get("trainer"))


def chosen_ids(cfg: DictConfig, num_examples: int) -> np.ndarray | None:
    """`score_ids` (a list, or a .txt/.json/.npy file of ids) as sorted unique ids; None: every id."""
    spec = cfg.get("score_ids")
    if spec is None:
        return None
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    ids = np.unique(parse_id_list(spec, num_examples, what="score_ids"))
    if len(ids) == 0:
        raise ValueError("score_ids is empty: give the ids to score, or null to score every example.")
    return ids


def run_attribution(cfg: DictConfig, run_dir: str | Path) -> np.ndarray:
    """Scores [num_queries, num_examples] of the run (see `attribute`)."""
    return attribute(cfg, run_dir).scores


def attribute(cfg: DictConfig, run_dir: str | Path) -> AttributionResult:
    run_dir = Path(run_dir)
    pl.seed_everything(cfg.seed)
    int_setting("top_k", cfg.get("top_k"))
    # Every method setting is checked (by the method's constructor) before any work: no model is
    # loaded and no query generated for a run that would fail on a bad setting.
    attributor: Attributor = hydra.utils.instantiate(cfg.method)
    datamodule: CaptionedImageDataModule = hydra.utils.instantiate(cfg.data)
    score_ids = chosen_ids(cfg, datamodule.num_examples)
    check_training_data(cfg.model.get("path"), cfg.data)
    model = model_from_config(cfg.model, require_path=True)
    model.to(inference_device(cfg)).eval()
    check_vocabulary(model, datamodule.source.all_captions())
    # The settings only the model and the data can check (a timestep past the scheduler's, a caption
    # index no example has), before the queries are generated and the method prepared.
    check_settings = getattr(attributor, "check_settings", None)
    if check_settings is not None:
        check_settings(model, datamodule)
    # Claimed only once the inputs are known to be good: a run that fails on a bad model path or
    # method setting leaves the directory free for the corrected rerun.
    claim_run_dir(run_dir, cfg)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    queries = build_queries(cfg.query, model, run_dir, **cfg.query.sampler)
    context = AttributionContext(
        Path(cfg.cache_dir), run_dir, trainer_kwargs(cfg), int(cfg.seed), candidate_ids=score_ids
    )
    started = time.perf_counter()
    attributor.prepare(model, datamodule, context)
    prepared = time.perf_counter()
    scores = mask_unscored(attributor.score(queries), score_ids)
    # Whatever the method: NaN or inf in scores.npy would rank as a plausible, wrong answer downstream.
    check_finite_scores(scores, attributor.name, queries)
    timing = {"prepare_s": prepared - started, "score_s": time.perf_counter() - prepared}
    metrics = None
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0:
        fingerprints = run_fingerprints(attributor, model, datamodule)
        png = write_outputs(
            run_dir, scores, queries, attributor, datamodule, cfg, timing, score_ids, fingerprints
        )
        log_ranking_to_wandb(cfg, png, run_dir)
        metrics = query_retrieval_metrics(scores, [q.record() for q in queries], datamodule, score_ids)
        if metrics is not None:
            (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
            log.info("Retrieval mAP %.4f, Recall@10 %.4f", metrics["map"], metrics["recall@10"])
            print(f"mAP: {metrics['map']:.4f}  Recall@10: {metrics['recall@10']:.4f}")
    return AttributionResult(scores, metrics)


def log_ranking_to_wandb(cfg: DictConfig, png: Path, run_dir: Path) -> None:
    """With logger=wandb: the ranking figure and a table of every query's top k."""
    ranking = json.loads((run_dir / "ranking.json").read_text())
    rows = [
        [q, r["caption"], t["id"], t["score"], t["file"]]
        for q, r in enumerate(ranking["queries"])
        for t in r["top_k"]
    ]
    columns = ["query", "caption", "id", "score", "file"]
    log_to_wandb(cfg.get("logger"), images={"ranking": png}, tables={"ranking/top_k": (columns, rows)})
