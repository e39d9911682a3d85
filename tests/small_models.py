"""conf/model/tiny.yaml shrunk further (16x16, narrower) so unit tests of the attribution maths run in
seconds; shared by the Fisher, loss-sweep and unlearning tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from diffusion_attribution.data.shapes import ShapesDataModule
from diffusion_attribution.models.build import build_tiny_model
from diffusion_attribution.models.pipeline import TextToImageModel

TINY = Path(__file__).resolve().parents[1] / "conf" / "model" / "tiny.yaml"
SMALLER = {
    "resolution": 16,
    "unet": {"block_out_channels": [8, 8, 16], "norm_num_groups": 4, "attention_head_dim": 4},
    "text_encoder": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    },
}


def small_model(captions: list[str], smaller: bool = True, **scheduler: Any) -> TextToImageModel:
    """A seeded random-init model for `captions` (smaller=False: the real tiny default)."""
    cfg = OmegaConf.load(TINY)
    if smaller:
        cfg = OmegaConf.merge(cfg, SMALLER)
    cfg = OmegaConf.merge(cfg, {"scheduler": scheduler})
    torch.manual_seed(0)
    return build_tiny_model(
        captions,
        resolution=cfg.resolution,
        unet=cfg.unet,
        text_encoder=cfg.text_encoder,
        scheduler=cfg.scheduler,
        max_length=cfg.max_length,
    )


def small_world(cache_dir: Path) -> ShapesDataModule:
    """The shapes world shrunk for unit tests: 32 plain images, 2 per rare concept, at SMALLER's
    resolution (48 images)."""
    return ShapesDataModule(
        num_common=32, images_per_rare_concept=2, cache_dir=str(cache_dir), resolution=SMALLER["resolution"]
    )
