"""The text-to-image diffusion model as one nn.Module: UNet, text encoder, tokenizer, noise schedule
and an optional VAE, saved as a diffusers-style folder that `from_pretrained` of diffusers and
transformers load directly.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoTokenizer, CLIPTextModel, PreTrainedTokenizerBase

from diffusion_attribution.models.tokenizer import report_unknown_words

CONFIG_FILE = "training_config.yaml"
MODEL_INDEX = "model_index.json"

logger = logging.getLogger(__name__)

T = TypeVar("T")


class CheckpointError(ValueError):
    """A model folder that is missing or not in the expected diffusers layout."""


class TextToImageModel(nn.Module):
    """UNet2DConditionModel conditioned by a transformers text encoder, pixel- or latent-space."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer: PreTrainedTokenizerBase,
        scheduler: DDPMScheduler,
        vae: AutoencoderKL | None = None,
        train_text_encoder: bool = True,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.vae = vae
        # False for a pretrained (frozen) text encoder: only the UNet trains.
        self.train_text_encoder = bool(train_text_encoder)
        if vae is not None:
            vae.requires_grad_(False)
        if not self.train_text_encoder:
            text_encoder.requires_grad_(False)

    # ----------------------------------------------------------------------------- properties
    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return (self.unet.config.in_channels, size, size)

    @property
    def image_resolution(self) -> int:
        size = self.latent_shape[1]
        if self.vae is None:
            return size
        return size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 1.0)) if self.vae is not None else 1.0

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def max_length(self) -> int:
        return min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ----------------------------------------------------------------------------- text
    def tokenize(self, captions: list[str]) -> torch.Tensor:
        report_unknown_words(self.tokenizer, captions)
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return tokens.input_ids.to(self.device)

    def encode_text(self, captions: list[str] | torch.Tensor) -> torch.Tensor:
        input_ids = captions if isinstance(captions, torch.Tensor) else self.tokenize(captions)
        return self.text_encoder(input_ids.to(self.device))[0]

    # ----------------------------------------------------------------------------- images
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> the UNet's input space. Latent models use the VAE posterior mean
        unless a generator is given (then a seeded sample), scaled by the VAE's scaling factor."""
        if self.vae is None:
            return pixels
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        latents = posterior.mean if generator is None else posterior.sample(generator)
        return latents * self.latent_scale

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.clamp(-1, 1)
        return self.vae.decode(latents.to(self.vae.dtype) / self.latent_scale).sample.clamp(-1, 1)

    # ----------------------------------------------------------------------------- diffusion
    def predict(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, text_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(noisy, timesteps, encoder_hidden_states=text_states).sample

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to output: the noise (epsilon) or the velocity (v)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(
            f"Unsupported prediction_type {self.prediction_type!r}: use epsilon or v_prediction."
        )

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    # ----------------------------------------------------------------------------- persistence
    def save_pretrained(self, path: str | Path, config: DictConfig | dict | None = None) -> Path:
        """Write the diffusers-style folder (safetensors) plus the Hydra config that made the model."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(path / "tokenizer")
        self.scheduler.save_pretrained(path / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(path / "vae", safe_serialization=True)
        index = {
            "_class_name": "TextToImageModel",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", type(self.text_encoder).__name__],
            "tokenizer": ["transformers", type(self.tokenizer).__name__],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
        }
        if self.vae is not None:
            index["vae"] = ["diffusers", "AutoencoderKL"]
        index["train_text_encoder"] = self.train_text_encoder
        (path / MODEL_INDEX).write_text(json.dumps(index, indent=2))
        if config is not None:
            if not isinstance(config, DictConfig):
                config = OmegaConf.create(config)
            (path / CONFIG_FILE).write_text(OmegaConf.to_yaml(config, resolve=True))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype | None = None) -> TextToImageModel:
        """Load a folder written by `save_pretrained` or any local diffusers text-to-image pipeline
        (e.g. Stable Diffusion 1.4: unet/, text_encoder/, tokenizer/, scheduler/, vae/)."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(
                f"Model folder {path} does not exist. Point model.path at a checkpoint folder written by "
                "train.py (outputs/.../checkpoint) or a local diffusers pipeline folder."
            )
        missing = [
            part for part in ("unet", "text_encoder", "tokenizer", "scheduler") if not (path / part).is_dir()
        ]
        if missing:
            raise CheckpointError(
                f"{path} is not a diffusers model folder: missing {missing}. A checkpoint has unet/, "
                "text_encoder/, tokenizer/, scheduler/ (and vae/ for latent models)."
            )
        index_file = path / MODEL_INDEX
        index = (
            _read_component(index_file, lambda: json.loads(index_file.read_text()))
            if index_file.is_file()
            else {}
        )
        # Every component in float32 unless asked otherwise (transformers would otherwise keep the
        # dtype the checkpoint was saved in, e.g. an fp16 text encoder next to an fp32 UNet).
        dtype = torch_dtype or torch.float32
        unet = _read_component(
            path / "unet", lambda: UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype)
        )
        text_encoder = _read_component(
            path / "text_encoder", lambda: CLIPTextModel.from_pretrained(path / "text_encoder").to(dtype)
        )
        tokenizer = _read_component(
            path / "tokenizer", lambda: _load_tokenizer(path / "tokenizer", index.get("tokenizer"))
        )
        has_vae = (path / "vae").is_dir()
        vae = (
            _read_component(
                path / "vae", lambda: AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype)
            )
            if has_vae
            else None
        )
        scheduler = _read_component(
            path / "scheduler", lambda: load_ddpm_scheduler(path / "scheduler", latent=has_vae)
        )
        # Absent in pipelines not written here (e.g. Stable Diffusion): a latent model's text
        # encoder is a pretrained one and stays frozen, a pixel model's was trained from scratch.
        train_text_encoder = bool(index.get("train_text_encoder", not has_vae))
        return cls(unet, text_encoder, tokenizer, scheduler, vae, train_text_encoder=train_text_encoder)


def _read_component(part: Path, read: Callable[[], T]) -> T:
    """`read()`, with any failure (a truncated safetensors file, unreadable JSON, missing files) turned
    into a CheckpointError that names the component and what to do."""
    try:
        return read()
    except CheckpointError:
        raise
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"Cannot load {part} ({type(error).__name__}: {reason}): the model folder {part.parent} is "
            "damaged or incomplete (e.g. a truncated weights file from an interrupted copy or a full disk). "
            "Copy or export the checkpoint again (train.py writes it to <run dir>/checkpoint; a released "
            "pipeline can be downloaded again), then point model.path at it."
        ) from error


def _load_tokenizer(folder: Path, declared: list[str | None] | None = None) -> PreTrainedTokenizerBase:
    """AutoTokenizer, or the class model_index.json declares where tokenizer_config.json names none."""
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError):
        if not declared or declared[0] != "transformers" or not hasattr(transformers, str(declared[1])):
            raise
        return getattr(transformers, str(declared[1])).from_pretrained(folder)


def load_ddpm_scheduler(folder: str | Path, latent: bool = False) -> DDPMScheduler:
    """A DDPMScheduler with the noise schedule of any diffusers scheduler config.

    Pipelines ship the sampler they were released with (Stable Diffusion 1.4: PNDMScheduler, 2.x:
    DDIMScheduler); training and the attribution losses only need the schedule (betas, number of
    steps, prediction type), which those configs share with DDPM. Keys DDPM does not have
    (skip_prk_steps, set_alpha_to_one, ...) are dropped. Where the config has no clip_sample (PNDM
    has none), a latent model gets False: latents are not confined to [-1, 1].
    """
    raw = DDPMScheduler.load_config(folder)
    source = raw.get("_class_name", "DDPMScheduler")
    accepted = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    config = {key: value for key, value in raw.items() if key in accepted}
    if latent and "clip_sample" not in raw:
        config["clip_sample"] = False
    if source != "DDPMScheduler":
        dropped = sorted(key for key in raw if key not in accepted and not key.startswith("_"))
        logger.info(
            "%s: using the noise schedule of its %s config with a DDPMScheduler (ignoring %s).",
            folder,
            source,
            dropped,
        )
    return DDPMScheduler(**config)


def load_training_config(path: str | Path) -> DictConfig | None:
    """The Hydra config a checkpoint was trained with, if it carries one."""
    file = Path(path) / CONFIG_FILE
    return OmegaConf.load(file) if file.is_file() else None
