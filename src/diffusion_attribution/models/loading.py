"""Turn a `model` config into a TextToImageModel: load `model.path` if set, else build from scratch."""

from __future__ import annotations

from collections.abc import Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

from diffusion_attribution.models.pipeline import TextToImageModel


def model_from_config(cfg: DictConfig, captions: Sequence[str] | None = None) -> TextToImageModel:
    path = cfg.get("path") if not OmegaConf.is_missing(cfg, "path") else None
    if path:
        model = TextToImageModel.from_pretrained(path)
        expected = cfg.get("resolution")
        if expected and not OmegaConf.is_missing(cfg, "resolution") and model.image_resolution != expected:
            raise ValueError(
                f"The model at {path} makes {model.image_resolution}px images but model.resolution is "
                f"{expected}: set model.resolution={model.image_resolution} so the data is resized to match."
            )
        return model
    if OmegaConf.is_missing(cfg, "path"):
        raise ValueError(
            "This model config loads an existing model: set model.path=<folder> (a checkpoint written "
            "by train.py, or a local diffusers pipeline such as Stable Diffusion 1.4)."
        )
    build_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "path"])
    builder = hydra.utils.instantiate(build_cfg, _partial_=True)
    return builder(captions=list(captions or []))
