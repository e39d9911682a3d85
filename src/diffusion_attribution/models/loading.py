"""Turn a `model` config into a TextToImageModel: load `model.path` if set, else build from scratch."""

from __future__ import annotations

from collections.abc import Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

from diffusion_attribution.models.customization import CustomizationError
from diffusion_attribution.models.pipeline import TextToImageModel

# Model configs whose `_target_` loads an existing model rather than building one: they need a path
# even where a config merge replaced their `???` with null.
PATH_LOADERS = {"diffusion_attribution.models.build.load_pretrained_model": ("path",)}
CUSTOMIZATION_LOADER = "diffusion_attribution.models.customization.load_customized_model"
CUSTOMIZATION_KEYS = ("base_path", "customization")


def _missing(cfg: DictConfig, key: str) -> bool:
    """Whether `key` is `???` (a DictConfig's `in` is False for it)."""
    try:
        return OmegaConf.is_missing(cfg, key)
    except Exception:  # not a key of this config at all
        return False


def _given(cfg: DictConfig, key: str) -> bool:
    return not _missing(cfg, key) and bool(cfg.get(key))


def model_from_config(
    cfg: DictConfig, captions: Sequence[str] | None = None, require_path: bool = False
) -> TextToImageModel:
    """The model `cfg` describes. `require_path`: the caller needs an existing (trained) model, so a
    config without `model.path` is an error rather than a freshly built, untrained model."""
    target = str(cfg.get("_target_", ""))
    if target == CUSTOMIZATION_LOADER:
        missing = [f"model.{key}" for key in CUSTOMIZATION_KEYS if not _given(cfg, key)]
        if missing:
            raise CustomizationError(
                f"model=custom_diffusion loads a base model plus a customization, but {' and '.join(missing)} "
                "is not set: give model.base_path=<base model folder> and model.customization="
                "<customization.safetensors, or an AbC model folder>."
            )
        build_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "path"])
        return hydra.utils.instantiate(build_cfg, _partial_=True)(captions=list(captions or []))
    path = cfg.get("path") if _given(cfg, "path") else None
    if path:
        model = TextToImageModel.from_pretrained(path)
        expected = cfg.get("resolution")
        if expected and not OmegaConf.is_missing(cfg, "resolution") and model.image_resolution != expected:
            raise ValueError(
                f"The model at {path} makes {model.image_resolution}px images but model.resolution is "
                f"{expected}: set model.resolution={model.image_resolution} so the data is resized to match."
            )
        return model
    if require_path or target in PATH_LOADERS or _missing(cfg, "path"):
        raise ValueError(
            "model.path is not set, but this job needs an existing model (a trained one is loaded, not "
            "built from scratch): set model.path=<folder> (a checkpoint folder written by train.py, e.g. "
            "outputs/.../checkpoint, or a local diffusers pipeline such as Stable Diffusion 1.4)."
        )
    build_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "path"])
    builder = hydra.utils.instantiate(build_cfg, _partial_=True)
    return builder(captions=list(captions or []))
