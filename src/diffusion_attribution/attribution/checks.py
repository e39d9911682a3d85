"""Checks an attribution run makes before any work: the data is the model's training data, the
model's tokenizer knows the data's words, and the run directory belongs to this configuration."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from diffusion_attribution.models.pipeline import CONFIG_FILE, TextToImageModel
from diffusion_attribution.models.tokenizer import caption_words, is_word_level
from diffusion_attribution.utils.fingerprint import hash_json

log = logging.getLogger(__name__)

# Data settings that only change how examples are loaded, not which examples there are.
LOADER_ONLY_DATA_KEYS = frozenset(
    {"batch_size", "num_workers", "cache_dir", "cache_images", "sample_prompts", "random_flip", "exclude"}
)
RUN_STAMP = "attribution_run.json"


class VocabularyMismatchError(ValueError):
    pass


class TrainingDataMismatchError(ValueError):
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


def claim_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """A run directory belongs to one configuration: rerunning the same config there resumes it,
    a different one is refused (outputs never overwrite an earlier run)."""
    stamp = run_dir / RUN_STAMP
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
