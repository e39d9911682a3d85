"""The paper's MSCOCO latent diffusion model: a UNet2DConditionModel trained from scratch (~57.4M
parameters) in the latent space of the Stable Diffusion 2 VAE, conditioned on the Stable Diffusion 2
text encoder (OpenCLIP ViT-H/14 as a transformers CLIPTextModel, width 1024). VAE, text encoder and
tokenizer are pretrained, loaded from local folders and frozen; only the UNet trains.

The three folders come from a Stable Diffusion 2 pipeline download, e.g.

    huggingface-cli download stabilityai/stable-diffusion-2-1-base \\
        --include "vae/*" "text_encoder/*" "tokenizer/*" --local-dir sd2

after which `model.vae_path=sd2 model.text_encoder_path=sd2 model.tokenizer_path=sd2` (each path may
be the pipeline folder or the component folder itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf
from transformers import CLIPTextModel, CLIPTokenizer

from diffusion_attribution.models.pipeline import TextToImageModel

SD2_REPO = "stabilityai/stable-diffusion-2-1-base"

# component -> (config key, pipeline subfolder, files that mark the component folder itself, what it is)
_COMPONENTS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "vae": ("model.vae_path", "vae", ("config.json",), "the Stable Diffusion 2 VAE"),
    "text_encoder": (
        "model.text_encoder_path",
        "text_encoder",
        ("config.json",),
        "the Stable Diffusion 2 text encoder (OpenCLIP ViT-H/14 as a transformers CLIPTextModel)",
    ),
    "tokenizer": (
        "model.tokenizer_path",
        "tokenizer",
        ("tokenizer_config.json", "tokenizer.json", "vocab.json"),
        "the Stable Diffusion 2 CLIP tokenizer",
    ),
}


def _as_dict(cfg: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg or {})


def coco_unet_config(unet: Mapping[str, Any] | DictConfig, sample_size: int = 16) -> dict[str, Any]:
    """The UNet2DConditionModel kwargs: `model.unet` (the paper's UNet is conf/model/coco_ldm.yaml, its
    one definition) with the latent size."""
    config = _as_dict(unet)
    given = config.pop("sample_size", None)
    if given is not None and given != sample_size:
        raise ValueError(
            f"model.unet.sample_size={given} contradicts model.resolution (latent size {sample_size}): "
            "leave model.unet.sample_size unset, it follows model.resolution and the VAE's downsampling."
        )
    return {**config, "sample_size": sample_size}


def _download_hint(component: str) -> str:
    key, sub, _, what = _COMPONENTS[component]
    return (
        f"download {what} ({SD2_REPO}, folder {sub}/) and set {key}=/path/to/{sub} "
        f"(or {key}=/path/to/pipeline, the downloaded folder that holds {sub}/)."
    )


def _missing_message(component: str) -> str:
    return f"{_COMPONENTS[component][0]} is not set: {_download_hint(component)}"


def _is_component_dir(folder: Path, component: str) -> bool:
    return any((folder / marker).is_file() for marker in _COMPONENTS[component][2])


def resolve_component(path: str | Path | None, component: str) -> Path:
    """The folder of `component` ("vae", "text_encoder" or "tokenizer"): `path` itself when it is
    that component's folder, else `path/<component>` when `path` is a pipeline folder."""
    key, sub, _, what = _COMPONENTS[component]
    if path is None or str(path) == "":
        raise ValueError(_missing_message(component))
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{key}={folder} does not exist: {_download_hint(component)}")
    if _is_component_dir(folder, component):
        return folder
    if (folder / sub).is_dir() and _is_component_dir(folder / sub, component):
        return folder / sub
    raise ValueError(
        f"{key}={folder} is neither a {sub} folder (with {' or '.join(_COMPONENTS[component][2])}) nor a "
        f"pipeline folder containing {sub}/. It should hold {what} from {SD2_REPO}."
    )


def _tokenizer_dir(tokenizer_path: str | Path | None, text_encoder_dir: Path) -> Path:
    """model.tokenizer_path, or, when unset, the tokenizer/ of the pipeline the text encoder is from."""
    if tokenizer_path is not None and str(tokenizer_path) != "":
        return resolve_component(tokenizer_path, "tokenizer")
    sibling = text_encoder_dir.parent / "tokenizer"
    if text_encoder_dir.name == "text_encoder" and _is_component_dir(sibling, "tokenizer"):
        return sibling
    raise ValueError(_missing_message("tokenizer"))


def build_coco_ldm_model(
    captions: Sequence[str] | None = None,
    vae_path: str | Path | None = None,
    text_encoder_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    unet: Mapping[str, Any] | DictConfig | None = None,
    scheduler: Mapping[str, Any] | DictConfig | None = None,
    resolution: int = 128,
    path: str | Path | None = None,
) -> TextToImageModel:
    """The paper's MSCOCO latent diffusion model with a randomly initialised UNet (`unet` and `scheduler`
    as conf/model/coco_ldm.yaml defines them: the paper's).

    `captions` is unused (the tokenizer is pretrained). With `path` set, the trained model saved
    there is loaded instead. When `tokenizer_path` is unset and the text encoder comes from a
    pipeline folder, that pipeline's tokenizer/ is used.
    """
    if path is not None and str(path) != "":
        return TextToImageModel.from_pretrained(path)
    if not unet or not scheduler:
        raise ValueError(
            "build_coco_ldm_model needs model.unet and model.scheduler: compose model=coco_ldm "
            "(conf/model/coco_ldm.yaml holds the paper's UNet and noise schedule)."
        )

    vae_dir = resolve_component(vae_path, "vae")
    text_encoder_dir = resolve_component(text_encoder_path, "text_encoder")
    tokenizer_dir = _tokenizer_dir(tokenizer_path, text_encoder_dir)

    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor != 0:
        raise ValueError(
            f"model.resolution={resolution} is not a multiple of the VAE's downsampling factor {factor} "
            f"({vae_dir})."
        )
    unet_config = coco_unet_config(unet, sample_size=resolution // factor)
    latent_channels = vae.config.latent_channels
    for key in ("in_channels", "out_channels"):
        if unet_config[key] != latent_channels:
            raise ValueError(
                f"model.unet.{key}={unet_config[key]} but the VAE at {vae_dir} has latent_channels="
                f"{latent_channels}: set model.unet.{key}={latent_channels} or use the Stable Diffusion 2 VAE."
            )

    text_encoder = CLIPTextModel.from_pretrained(text_encoder_dir).to(torch.float32)
    hidden_size = text_encoder.config.hidden_size
    if unet_config["cross_attention_dim"] != hidden_size:
        raise ValueError(
            f"model.unet.cross_attention_dim={unet_config['cross_attention_dim']} but the text encoder at "
            f"{text_encoder_dir} has hidden_size={hidden_size}: set model.unet.cross_attention_dim="
            f"{hidden_size}, or use the Stable Diffusion 2 text encoder (OpenCLIP ViT-H, width 1024)."
        )
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > text_encoder.config.vocab_size:
        raise ValueError(
            f"The tokenizer at {tokenizer_dir} has {len(tokenizer)} tokens but the text encoder at "
            f"{text_encoder_dir} only {text_encoder.config.vocab_size}: they are not from the same model."
        )

    unet_model = UNet2DConditionModel(**unet_config)
    ddpm = DDPMScheduler(**_as_dict(scheduler))
    return TextToImageModel(unet_model, text_encoder, tokenizer, ddpm, vae, train_text_encoder=False)
