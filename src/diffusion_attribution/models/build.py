"""Builders the `model/` config group instantiates (`_target_`, `_partial_`): each takes the training
captions (for a tokenizer built from them) plus its own settings and returns a TextToImageModel."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler, UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf
from transformers import CLIPTextConfig, CLIPTextModel

from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.models.tokenizer import build_word_tokenizer


def _plain(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg or {})


def build_scheduler(scheduler: dict[str, Any] | DictConfig) -> DDPMScheduler:
    return DDPMScheduler(**_plain(scheduler))


def build_tiny_model(
    captions: Sequence[str],
    resolution: int = 32,
    unet: dict[str, Any] | None = None,
    text_encoder: dict[str, Any] | None = None,
    scheduler: dict[str, Any] | None = None,
    max_length: int = 16,
) -> TextToImageModel:
    """Pixel-space UNet + a small CLIP text encoder and a word-level tokenizer, all from random init.

    Pixel space because no pretrained VAE can be downloaded here and a 32x32 image is already as
    small as a latent: the whole model trains in minutes on two CPU cores.
    """
    tokenizer = build_word_tokenizer(captions, max_length=max_length)
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **_plain(text_encoder),
    )
    unet_kwargs = _plain(unet)
    unet_kwargs.setdefault("cross_attention_dim", text_cfg.hidden_size)
    if unet_kwargs["cross_attention_dim"] != text_cfg.hidden_size:
        raise ValueError(
            f"model.unet.cross_attention_dim ({unet_kwargs['cross_attention_dim']}) must equal "
            f"model.text_encoder.hidden_size ({text_cfg.hidden_size})."
        )
    unet_model = UNet2DConditionModel(sample_size=resolution, in_channels=3, out_channels=3, **unet_kwargs)
    return TextToImageModel(unet_model, CLIPTextModel(text_cfg), tokenizer, build_scheduler(scheduler or {}))


def load_pretrained_model(
    captions: Sequence[str] | None = None, path: str | Path | None = None
) -> TextToImageModel:
    """Any local diffusers pipeline folder or a checkpoint written by train.py."""
    if path is None:
        raise ValueError(
            "model=pretrained needs model.path: a local diffusers pipeline folder (e.g. Stable Diffusion "
            "1.4 with unet/, text_encoder/, tokenizer/, scheduler/, vae/) or a checkpoint from train.py."
        )
    return TextToImageModel.from_pretrained(path)
