"""Tiny random-initialised stand-ins for the feature backbones, saved in the real on-disk formats of
their downloads (transformers `save_pretrained`, safetensors, the image processor's
preprocessor_config.json, a CLIP BPE tokenizer): `openai/clip-vit-base-patch32` (CLIPModel),
`facebook/dino-vitb16` (ViTModel without pooler) and `facebook/dinov2-base` (Dinov2Model).

Their input size (40 px, resized by the processor from the data's 32 px) differs from the data's on
purpose, so preprocessing is exercised. Weights are drawn wider than the default init so that the
random features tell images apart.
"""

from __future__ import annotations

from pathlib import Path

import torch
from fixtures_models import write_clip_bpe_files
from transformers import (
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

IMAGE_SIZE = 40
PATCH = 8
WIDTH = 32
INIT_RANGE = 0.2
# The words of the shapes world's captions, so that they tokenize to whole-word BPE tokens.
SHAPES_WORDS = [
    "a", "on", "background", "with", "red", "green", "blue", "yellow", "black", "white", "gray",
    "circle", "square", "triangle", "cross", "striped", "barred", "checkered", "dotted", "ringed",
    "hollow", "haloed", "split",
]  # fmt: skip


def _tower(**extra: int | float | str) -> dict:
    return {
        "hidden_size": WIDTH,
        "intermediate_size": 2 * WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "initializer_range": INIT_RANGE,
        **extra,
    }


def write_tiny_clip(folder: Path) -> Path:
    """A CLIPModel folder (both towers, projection 16) with its image processor and BPE tokenizer."""
    folder = Path(folder)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_bpe_files(folder, SHAPES_WORDS))
    config = CLIPConfig(
        text_config=_tower(
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=_tower(image_size=IMAGE_SIZE, patch_size=PATCH),
        projection_dim=16,
        initializer_factor=INIT_RANGE / 0.02,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(folder)
    return folder


def write_tiny_dino(folder: Path, seed: int = 1) -> Path:
    """A ViTModel folder without pooler (as facebook/dino-vitb16) and a ViTImageProcessor."""
    folder = Path(folder)
    config = ViTConfig(**_tower(image_size=IMAGE_SIZE, patch_size=PATCH))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ViTModel(config, add_pooling_layer=False).save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return folder


def write_tiny_dinov2(folder: Path) -> Path:
    """A Dinov2Model folder and the BitImageProcessor facebook/dinov2-base ships (resize + crop)."""
    folder = Path(folder)
    config = Dinov2Config(**_tower(image_size=IMAGE_SIZE, patch_size=PATCH))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        Dinov2Model(config).save_pretrained(folder, safe_serialization=True)
    BitImageProcessor(
        size={"shortest_edge": IMAGE_SIZE + 8},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_convert_rgb=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return folder


WRITERS = {
    "clip": write_tiny_clip,
    "clip_text": write_tiny_clip,
    "dino": write_tiny_dino,
    "dinov2": write_tiny_dinov2,
}
