"""The job behind attribute.py: load the model and its training data, build the queries, run the
method (prepare once, score all queries) and write scores.npy, ranking.json and ranking.png."""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_attribution.attribution.base import AttributionContext, Attributor
from diffusion_attribution.attribution.queries import Query, build_queries
from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.models.loading import model_from_config
from diffusion_attribution.models.pipeline import CONFIG_FILE, TextToImageModel
from diffusion_attribution.models.tokenizer import caption_words, is_word_level
from diffusion_attribution.utils.fingerprint import hash_json
from diffusion_attribution.utils.images import titled_grid

logger = logging.getLogger(__name__)

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


class VocabularyMismatchError(ValueError):
    pass


def check_vocabulary(
    model: TextToImageModel, captions: list[str], max_unknown_fraction: float = 0.05
) -> None:
    """A word-level tokenizer that does not know the data's words means the model was trained on
    other data: attribution would compare against captions the model never read."""
    if not is_word_level(model.tokenizer):
        return
    vocab = model.tokenizer.get_vocab()
    words = {w for c in captions for w in caption_words(c)}
    unknown = sorted(w for w in words if w not in vocab)
    if words and len(unknown) / len(words) > max_unknown_fraction:
        raise VocabularyMismatchError(
            f"The model's tokenizer does not know {len(unknown)} of the {len(words)} words in the data's captions "
            f"(e.g. {unknown[:8]}): this model was not trained on this data. Give the data= the model was "
            "trained on (its config is in <checkpoint>/training_config.yaml)."
        )


# Data settings that only change how examples are loaded, not which examples there are.
LOADER_ONLY_DATA_KEYS = frozenset(
    {"batch_size", "num_workers", "cache_dir", "cache_images", "sample_prompts", "random_flip", "exclude"}
)


class TrainingDataMismatchError(ValueError):
    pass


def with_constructor_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A data config with the keys it leaves out set to its datamodule's defaults: a checkpoint
    trained before a data setting existed recorded no value for it, and was trained with the default
    (e.g. data.concept_colours: white)."""
    try:
        target = hydra.utils.get_class(data["_target_"])
    except Exception:  # an unimportable target is reported where the data is built
        return dict(data)
    defaults = {
        name: param.default
        for name, param in inspect.signature(target.__init__).parameters.items()
        if param.default is not inspect.Parameter.empty and param.kind is param.POSITIONAL_OR_KEYWORD
    }
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}, **data}


def check_training_data(model_path: str | Path | None, data_cfg: DictConfig) -> None:
    """Attribution ranks the model's own training set: a checkpoint written by train.py records the
    data it was trained on, and data= here must describe the same examples (same ids)."""
    if not model_path:
        return
    config_file = Path(model_path) / CONFIG_FILE
    if not config_file.is_file():
        return  # a pipeline not trained here (e.g. Stable Diffusion): nothing to compare against
    trained = OmegaConf.load(config_file).get("data")
    if not trained or trained.get("_target_") != data_cfg.get("_target_"):
        return  # other data kinds (folder vs coco) are the user's call; the vocabulary check still runs
    mine = with_constructor_defaults(OmegaConf.to_container(data_cfg, resolve=True))
    theirs = with_constructor_defaults(OmegaConf.to_container(trained, resolve=True))
    differing = sorted(
        key
        for key in set(mine) | set(theirs)
        if key not in LOADER_ONLY_DATA_KEYS and mine.get(key) != theirs.get(key)
    )
    if differing:
        fix = " ".join(f"data.{key}={json.dumps(theirs.get(key)).replace(' ', '')}" for key in differing)
        raise TrainingDataMismatchError(
            f"{model_path} was trained on different data: {', '.join(differing)} differ from data= here, so "
            f"training ids would not match. Attribute with the model's training data, e.g. add: {fix}"
        )


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    trainer_cfg = cfg.get("trainer")
    if not trainer_cfg:
        return {}
    keep = [k for k in INFERENCE_TRAINER_KEYS if k in trainer_cfg]
    return OmegaConf.to_container(OmegaConf.masked_copy(trainer_cfg, keep), resolve=True)  # type: ignore[return-value]


def claim_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """A run directory belongs to one configuration: rerunning the same config there resumes it,
    a different one is refused (outputs never overwrite an earlier run)."""
    stamp = run_dir / "attribution_run.json"
    key = hash_json(OmegaConf.to_container(cfg, resolve=True))
    if stamp.is_file():
        existing = json.loads(stamp.read_text())
        if existing.get("config_hash") != key:
            raise FileExistsError(
                f"{run_dir} already holds a different attribution run (config hash {existing.get('config_hash')} "
                f"!= {key}). Leave hydra.run.dir at its default (a new directory per run) or pick an empty one."
            )
        log.info("Resuming the attribution run in %s", run_dir)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"config_hash": key}))


def run_attribution(cfg: DictConfig, run_dir: str | Path) -> np.ndarray:
    run_dir = Path(run_dir)
    pl.seed_everything(cfg.seed)
    datamodule: CaptionedImageDataModule = hydra.utils.instantiate(cfg.data)
    model = model_from_config(cfg.model)
    model.to("cuda" if torch.cuda.is_available() and cfg.get("device", "auto") != "cpu" else "cpu").eval()
    check_training_data(cfg.model.get("path"), cfg.data)
    check_vocabulary(model, datamodule.source.all_captions())
    # The method's settings are checked (by its constructor) before any query is generated.
    attributor: Attributor = hydra.utils.instantiate(cfg.method)
    # Claimed only once the inputs are known to be good: a run that fails on a bad model path or
    # method setting leaves the directory free for the corrected rerun.
    claim_run_dir(run_dir, cfg)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    queries = build_queries(cfg.query, model, run_dir, **cfg.query.sampler)
    context = AttributionContext(Path(cfg.cache_dir), run_dir, trainer_kwargs(cfg), int(cfg.seed))
    started = time.perf_counter()
    attributor.prepare(model, datamodule, context)
    prepared = time.perf_counter()
    scores = attributor.score(queries)
    timing = {"prepare_s": prepared - started, "score_s": time.perf_counter() - prepared}
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0:
        write_outputs(run_dir, scores, queries, attributor, datamodule, cfg, timing)
    return scores


def write_outputs(
    run_dir: Path,
    scores: np.ndarray,
    queries: list[Query],
    attributor: Attributor,
    datamodule: CaptionedImageDataModule,
    cfg: DictConfig,
    timing: dict[str, float],
) -> None:
    top_k = int(cfg.top_k)
    tmp = run_dir / ".scores.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, scores.astype(np.float32))
    os.replace(tmp, run_dir / "scores.npy")
    source = datamodule.source
    records = []
    for k, query in enumerate(queries):
        order = np.argsort(-scores[k], kind="stable")[:top_k]
        record = {
            **query.record(),
            "top_k": [
                {"id": int(i), "score": float(scores[k, i]), "file": source.file_name(int(i))} for i in order
            ],
        }
        if k < len(attributor.query_records):
            record["diagnostics"] = attributor.query_records[k]
        records.append(record)
    ranking = {
        "method": attributor.name,
        "method_config": attributor.config(),
        "model": cfg.model.get("path"),
        "num_examples": int(scores.shape[1]),
        "timing": timing,
        "train_side_mb": attributor.train_side_bytes() / 2**20,
        "queries": records,
    }
    (run_dir / "ranking.json").write_text(json.dumps(ranking, indent=2, default=str))
    png = ranking_figure(run_dir / "ranking.png", scores, queries, datamodule, top_k=min(top_k, 8))
    log.info("Wrote %s, ranking.json and %s", run_dir / "scores.npy", png)
    print(f"Ranking: {png}")
    _log_to_wandb(cfg, png, records)


def ranking_figure(
    path: Path, scores: np.ndarray, queries: list[Query], datamodule: CaptionedImageDataModule, top_k: int = 8
) -> Path:
    """Each row: the query, then its top-k training images with id and score."""
    dataset = datamodule.full_dataset()
    images, titles = [], []
    for k, query in enumerate(queries):
        images.append(query.image)
        titles.append(f"query {k}\n{query.caption[:40]}")
        for i in np.argsort(-scores[k], kind="stable")[:top_k]:
            images.append(dataset.example(int(i))["pixel_values"])
            titles.append(f"#{int(i)}\n{scores[k, i]:.2e}")
    return titled_grid(
        torch.stack(images), titles, path, ncol=top_k + 1, suptitle="query | top training images (id, score)"
    )


def _log_to_wandb(cfg: DictConfig, png: Path, records: list[dict[str, Any]]) -> None:
    logger_cfg = cfg.get("logger")
    if not logger_cfg or "Wandb" not in str(logger_cfg.get("_target_", "")):
        return
    import wandb

    logger = hydra.utils.instantiate(logger_cfg)
    logger.log_image("ranking", [str(png)])
    rows = [
        [q, r["caption"], t["id"], t["score"], t["file"]] for q, r in enumerate(records) for t in r["top_k"]
    ]
    logger.log_table("ranking/top_k", columns=["query", "caption", "id", "score", "file"], data=rows)
    wandb.finish()
