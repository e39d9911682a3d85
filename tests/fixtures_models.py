"""Tiny random-initialised stand-ins for pretrained Stable Diffusion components, written in the real
on-disk formats (diffusers/transformers `save_pretrained`, safetensors; CLIP BPE vocab.json and
merges.txt; a StableDiffusionPipeline model_index.json). One folder serves both as a "pretrained SD
pipeline" and as the component paths of `model=coco_ldm`.

Sizes: 32x32 images, a VAE with one 2x downsampling (16x16x4 latents), a 2-layer CLIP text encoder
of width 32, a two-level UNet. The whole folder is a few hundred KB and takes well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

IMAGE_SIZE = 32
LATENT_SIZE = 16
TEXT_WIDTH = 32
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Words the tiny BPE merges into single tokens; anything else still tokenizes, byte by byte.
WORDS = ["a", "an", "the", "photo", "of", "cat", "dog", "on", "red", "blue", "car", "sitting", "table"]

# A shrunk coco_ldm UNet (`model.unet` of build_coco_ldm_model) matching the tiny text encoder.
TINY_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [8, 16],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "norm_num_groups": 4,
    "cross_attention_dim": TEXT_WIDTH,
}

# As in Stable Diffusion 1.4's scheduler/scheduler_config.json (PNDM, scaled-linear betas).
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0..255: printable Latin-1
    bytes stand for themselves, the others (controls, space, ...) for the code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _merges_for(words: list[str]) -> list[tuple[str, str]]:
    """Left-to-right merges that turn each word into one end-of-word token."""
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
    return merges


def write_clip_bpe_files(folder: Path, words: list[str] = WORDS) -> Path:
    """vocab.json + merges.txt + tokenizer_config.json + special_tokens_map.json as in an SD
    pipeline's tokenizer/ folder: byte symbols, byte symbols + '</w>', merged tokens, then specials."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    merges = _merges_for(words)
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def write_tiny_sd_components(root: Path) -> Path:
    """Write a tiny Stable-Diffusion-layout pipeline folder (unet/, vae/, text_encoder/, tokenizer/,
    scheduler/, model_index.json) under `root` and return `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_bpe_files(root / "tokenizer"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=IMAGE_SIZE,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TEXT_WIDTH,
                intermediate_size=2 * TEXT_WIDTH,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=MAX_LENGTH,
                hidden_act="gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(sample_size=LATENT_SIZE, **TINY_UNET)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    text_encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    PNDMScheduler(**SD_SCHEDULER).save_pretrained(root / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.8.0",
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root
