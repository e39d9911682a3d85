"""`model=coco_ldm` (the paper's MSCOCO latent diffusion model) and `model=pretrained` (a local
Stable-Diffusion-layout pipeline), on tiny random stand-ins written in the real formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from fixtures_models import IMAGE_SIZE, LATENT_SIZE, TEXT_WIDTH, TINY_UNET, write_tiny_sd_components
from omegaconf import OmegaConf
from transformers import CLIPTextModel, CLIPTokenizer

from diffusion_attribution.models.build import load_pretrained_model
from diffusion_attribution.models.coco_ldm import (
    build_coco_ldm_model,
    coco_unet_config,
)
from diffusion_attribution.models.loading import model_from_config
from diffusion_attribution.models.pipeline import TextToImageModel

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
PAPER = OmegaConf.load(CONF / "coco_ldm.yaml")  # the paper's UNet and schedule: their one definition
PROMPTS = ["a photo of a cat", "a red car on the table"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sd_components(tmp_path_factory.mktemp("tiny_sd"))


def build_tiny_coco(sd_dir: Path, **kwargs) -> TextToImageModel:
    settings = {
        "vae_path": sd_dir,
        "text_encoder_path": sd_dir,
        "tokenizer_path": sd_dir,
        "unet": TINY_UNET,
        "scheduler": OmegaConf.to_container(PAPER.scheduler),
        "resolution": IMAGE_SIZE,
        **kwargs,
    }
    return build_coco_ldm_model(captions=PROMPTS, **settings)


def unet_outputs(model: TextToImageModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, *model.latent_shape, generator=generator)
    with torch.no_grad():
        return model.predict(latents, torch.tensor([10, 900]), model.encode_text(PROMPTS))


# ------------------------------------------------------------------------------------------ paper UNet
def test_paper_unet_size() -> None:
    unet = UNet2DConditionModel(**coco_unet_config(PAPER.unet, sample_size=128 // 8))
    total = sum(p.numel() for p in unet.parameters())
    cross_kv = sum(
        p.numel() for name, p in unet.named_parameters() if "attn2.to_k" in name or "attn2.to_v" in name
    )
    assert abs(total - 57.4e6) < 0.2e6
    assert abs(cross_kv - 7.1e6) < 0.1e6
    assert unet.config.sample_size == 16 and unet.config.in_channels == 4


def test_yaml_defaults_are_the_paper_model() -> None:
    cfg = OmegaConf.load(CONF / "coco_ldm.yaml")
    assert cfg._target_ == "diffusion_attribution.models.coco_ldm.build_coco_ldm_model"
    assert cfg.path is None and cfg.resolution == 128
    assert cfg.vae_path is None and cfg.text_encoder_path is None and cfg.tokenizer_path is None
    assert OmegaConf.to_container(cfg.scheduler) == {
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "prediction_type": "epsilon",
        "clip_sample": False,
    }


def test_unet_sample_size_follows_resolution() -> None:
    assert coco_unet_config(PAPER.unet, sample_size=32)["sample_size"] == 32
    with pytest.raises(ValueError, match="model.unet.sample_size"):
        coco_unet_config({**PAPER.unet, "sample_size": 64}, sample_size=16)


# ------------------------------------------------------------------------------------------ coco_ldm
def test_coco_ldm_builds_and_runs(sd_dir: Path) -> None:
    model = build_tiny_coco(sd_dir)
    assert model.is_latent and model.latent_shape == (4, LATENT_SIZE, LATENT_SIZE)
    assert model.image_resolution == IMAGE_SIZE
    assert isinstance(model.tokenizer, CLIPTokenizer)
    assert model.unet.config.cross_attention_dim == TEXT_WIDTH

    pixels = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    latents = model.encode_images(pixels)
    assert latents.shape == (2, 4, LATENT_SIZE, LATENT_SIZE)
    noise = torch.randn_like(latents)
    timesteps = torch.tensor([0, 999])
    noisy = model.add_noise(latents, noise, timesteps)
    prediction = model.predict(noisy, timesteps, model.encode_text(PROMPTS))
    assert prediction.shape == latents.shape
    loss = torch.nn.functional.mse_loss(prediction, model.target(latents, noise, timesteps))
    loss.backward()
    assert all(p.grad is not None for p in model.unet.parameters() if p.requires_grad)
    assert model.decode_latents(latents).shape == pixels.shape


def test_coco_ldm_scheduler_is_ddpm_linear(sd_dir: Path) -> None:
    config = build_tiny_coco(sd_dir).scheduler.config
    assert config.num_train_timesteps == 1000 and config.beta_schedule == "linear"
    assert config.beta_start == pytest.approx(1e-4) and config.beta_end == pytest.approx(0.02)
    assert config.prediction_type == "epsilon" and config.clip_sample is False
    override = build_tiny_coco(sd_dir, scheduler={"prediction_type": "v_prediction"}).scheduler
    assert override.config.prediction_type == "v_prediction" and override.config.beta_schedule == "linear"


def test_coco_ldm_freezes_text_encoder_and_vae(sd_dir: Path) -> None:
    model = build_tiny_coco(sd_dir)
    assert model.train_text_encoder is False
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert all(p.requires_grad for p in model.unet.parameters())
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"unet"}


def test_coco_ldm_round_trip(sd_dir: Path, tmp_path: Path) -> None:
    model = build_tiny_coco(sd_dir).eval()
    saved = model.save_pretrained(tmp_path / "checkpoint")
    assert json.loads((saved / "model_index.json").read_text())["train_text_encoder"] is False

    loaded = TextToImageModel.from_pretrained(saved).eval()
    assert loaded.train_text_encoder is False
    assert not any(p.requires_grad for p in loaded.text_encoder.parameters())
    assert loaded.scheduler.config.beta_schedule == "linear" and loaded.scheduler.config.clip_sample is False
    assert torch.equal(unet_outputs(model), unet_outputs(loaded))

    # The folder is plain diffusers / transformers.
    assert UNet2DConditionModel.from_pretrained(saved / "unet").config.sample_size == LATENT_SIZE
    assert AutoencoderKL.from_pretrained(saved / "vae").config.latent_channels == 4
    assert CLIPTextModel.from_pretrained(saved / "text_encoder").config.hidden_size == TEXT_WIDTH
    assert (
        CLIPTokenizer.from_pretrained(saved / "tokenizer")("a cat").input_ids
        == model.tokenizer("a cat").input_ids
    )

    # path= loads the trained model instead of building a fresh one.
    again = build_coco_ldm_model(path=saved).eval()
    assert torch.equal(unet_outputs(model), unet_outputs(again))


def test_coco_ldm_component_folders(sd_dir: Path) -> None:
    """Each path may be the component folder itself; the tokenizer defaults to the text encoder's
    pipeline when unset."""
    direct = build_tiny_coco(
        sd_dir,
        vae_path=sd_dir / "vae",
        text_encoder_path=sd_dir / "text_encoder",
        tokenizer_path=sd_dir / "tokenizer",
    )
    assert direct.latent_shape == (4, LATENT_SIZE, LATENT_SIZE)
    for text_encoder_path in (sd_dir, sd_dir / "text_encoder"):
        model = build_tiny_coco(sd_dir, text_encoder_path=text_encoder_path, tokenizer_path=None)
        assert model.tokenizer("a cat").input_ids == direct.tokenizer("a cat").input_ids


@pytest.mark.parametrize(
    ("missing", "key", "folder"),
    [
        ("vae_path", "model.vae_path", "vae/"),
        ("text_encoder_path", "model.text_encoder_path", "text_encoder/"),
    ],
)
def test_coco_ldm_missing_path_says_what_to_download(
    sd_dir: Path, missing: str, key: str, folder: str
) -> None:
    with pytest.raises(ValueError) as error:
        build_tiny_coco(sd_dir, **{missing: None})
    message = str(error.value)
    assert f"{key} is not set" in message
    assert "stabilityai/stable-diffusion-2-1-base" in message and folder in message
    assert f"{key}=/path/to/" in message


def test_coco_ldm_missing_tokenizer(sd_dir: Path, tmp_path: Path) -> None:
    lone = tmp_path / "my_text_encoder"
    shutil.copytree(sd_dir / "text_encoder", lone)
    with pytest.raises(ValueError, match=r"model\.tokenizer_path is not set: download .*tokenizer/"):
        build_tiny_coco(sd_dir, text_encoder_path=lone, tokenizer_path=None)


def test_coco_ldm_bad_paths(sd_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model\.vae_path=.*does not exist"):
        build_tiny_coco(sd_dir, vae_path=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"model\.text_encoder_path=.*neither a text_encoder folder"):
        build_tiny_coco(sd_dir, text_encoder_path=tmp_path / "empty")


def test_coco_ldm_mismatches_are_explained(sd_dir: Path) -> None:
    # The paper UNet expects the 1024-wide SD-2 text encoder, the tiny one is 32 wide.
    with pytest.raises(ValueError, match=r"cross_attention_dim=1024 .*hidden_size=32"):
        build_tiny_coco(sd_dir, unet=OmegaConf.to_container(PAPER.unet))
    with pytest.raises(ValueError, match="needs model.unet and model.scheduler"):
        build_tiny_coco(sd_dir, unet=None)
    with pytest.raises(ValueError, match=r"model\.unet\.in_channels=3 .*latent_channels=4"):
        build_tiny_coco(sd_dir, unet={**TINY_UNET, "in_channels": 3})
    with pytest.raises(ValueError, match="not a multiple of the VAE's downsampling factor 2"):
        build_tiny_coco(sd_dir, resolution=33)


def test_coco_ldm_through_the_config_loader(sd_dir: Path) -> None:
    cfg = OmegaConf.load(CONF / "coco_ldm.yaml")
    overrides = {"vae_path": str(sd_dir), "text_encoder_path": str(sd_dir), "resolution": IMAGE_SIZE}
    cfg = OmegaConf.merge(cfg, overrides)
    cfg.unet = TINY_UNET  # replace, not merge: the tiny UNet has fewer blocks
    model = model_from_config(cfg, captions=PROMPTS)
    assert model.latent_shape == (4, LATENT_SIZE, LATENT_SIZE) and model.train_text_encoder is False


# ------------------------------------------------------------------------------------------ pretrained
def test_pretrained_stable_diffusion_layout(sd_dir: Path, tmp_path: Path) -> None:
    index = json.loads((sd_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]

    model = load_pretrained_model(path=sd_dir).eval()
    assert model.is_latent and model.image_resolution == IMAGE_SIZE
    assert isinstance(model.tokenizer, CLIPTokenizer)
    # The PNDM config becomes a DDPM schedule with the same betas, without sample clipping.
    assert isinstance(model.scheduler, DDPMScheduler)
    assert model.scheduler.config.beta_schedule == "scaled_linear"
    assert model.scheduler.config.beta_start == pytest.approx(0.00085)
    assert model.scheduler.config.clip_sample is False
    assert "skip_prk_steps" not in model.scheduler.config
    assert model.train_text_encoder is False
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert model.encode_images(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)).shape == (1, 4, 16, 16)

    outputs = unet_outputs(model)
    assert outputs.shape == (2, 4, LATENT_SIZE, LATENT_SIZE)
    reloaded = TextToImageModel.from_pretrained(model.save_pretrained(tmp_path / "copy")).eval()
    assert reloaded.train_text_encoder is False
    assert torch.equal(outputs, unet_outputs(reloaded))


def test_pretrained_through_the_config_loader(sd_dir: Path) -> None:
    cfg = OmegaConf.load(CONF / "pretrained.yaml")
    assert cfg._target_ == "diffusion_attribution.models.build.load_pretrained_model"
    assert OmegaConf.is_missing(cfg, "path") and cfg.resolution == 512
    with pytest.raises(ValueError, match="model.resolution=32"):
        model_from_config(OmegaConf.merge(cfg, {"path": str(sd_dir)}))
    model = model_from_config(OmegaConf.merge(cfg, {"path": str(sd_dir), "resolution": IMAGE_SIZE}))
    assert model.image_resolution == IMAGE_SIZE


def test_pixel_checkpoint_without_flag_keeps_training_its_text_encoder(sd_dir: Path, tmp_path: Path) -> None:
    """Older pixel-space checkpoints have no train_text_encoder key: their text encoder trains."""
    model = load_pretrained_model(path=sd_dir)
    pixel = TextToImageModel(model.unet, model.text_encoder, model.tokenizer, model.scheduler)
    folder = pixel.save_pretrained(tmp_path / "pixel")
    index = json.loads((folder / "model_index.json").read_text())
    assert index.pop("train_text_encoder") is True
    (folder / "model_index.json").write_text(json.dumps(index))
    assert TextToImageModel.from_pretrained(folder).train_text_encoder is True
