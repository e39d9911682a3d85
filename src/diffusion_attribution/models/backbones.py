"""Feature backbones for similarity baselines and evaluation: pixels, CLIP (image and text towers),
DINO and DINOv2, behind one small interface.

    backbone = load_backbone("clip", "/models/clip-vit-base-patch32", device="cuda")
    backbone.image_features(pixels)   # pixels [B, 3, H, W] in [-1, 1] -> [B, D] (not normalised)
    backbone.text_features(captions)  # list of B strings -> [B, D] (CLIP only)

Weights come only from a local folder saved with transformers' `save_pretrained` (e.g. a download of
`openai/clip-vit-base-patch32`); nothing touches the network. Images are preprocessed by the folder's
own image processor (resize, crop, normalise), as the model was trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffusion_attribution.utils.fingerprint import hash_json, module_fingerprint

# name -> (what to download, the model_type values its config.json may have, what the features are)
BACKBONES: dict[str, tuple[str | None, tuple[str, ...], str]] = {
    "pixel": (None, (), "centred pixels of the image at the data's resolution"),
    "clip": (
        "openai/clip-vit-base-patch32",
        ("clip",),
        "CLIP image embedding (vision tower + projection)",
    ),
    "clip_text": (
        "openai/clip-vit-base-patch32",
        ("clip",),
        "CLIP text embedding of the captions (text tower + projection)",
    ),
    "dino": ("facebook/dino-vitb16", ("vit",), "DINO ViT CLS token"),
    "dinov2": ("facebook/dinov2-base", ("dinov2",), "DINOv2 CLS token"),
}


class BackboneError(ValueError):
    """An unknown backbone, or weights that are missing or of the wrong kind; the message says the fix."""


def describe_backbones() -> str:
    return "; ".join(
        f"{name} ({what}{', weights: ' + repo if repo else ''})"
        for name, (repo, _, what) in BACKBONES.items()
    )


def check_backbone(name: str, path: str | Path | None) -> Path | None:
    """Validate a backbone name and its weights folder without loading anything (cheap: config time)."""
    if name not in BACKBONES:
        raise BackboneError(f"Unknown backbone {name!r}. Options: {describe_backbones()}.")
    repo, model_types, _ = BACKBONES[name]
    if repo is None:
        return None
    download = (
        f"Download {repo} where there is internet (e.g. `hf download {repo} --local-dir <dir>`), copy the "
        f"folder here and set backbone.path=<dir> (weights are only read from a local folder)."
    )
    if path is None or str(path).strip() == "":
        raise BackboneError(f"backbone={name} needs its weights: backbone.path is not set. {download}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise BackboneError(f"backbone.path={folder} does not exist. {download}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise BackboneError(
            f"backbone.path={folder} holds no config.json: it is not a transformers model folder. {download}"
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in model_types:
        raise BackboneError(
            f"backbone.path={folder} holds a {model_type!r} model but backbone={name} needs one of "
            f"{list(model_types)} (e.g. {repo}). Point backbone.path at such a folder, or pick the backbone "
            "that matches the folder."
        )
    return folder


def _to_uint8_images(pixels: torch.Tensor) -> list[np.ndarray]:
    """[-1, 1] tensors [B, 3, H, W] -> HWC uint8 arrays, the input image processors are made for."""
    array = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(array.permute(0, 2, 3, 1).cpu().numpy())


class FeatureBackbone(nn.Module):
    """The interface. `side` is what the feature baseline compares ("image" or "text")."""

    name: str = "backbone"
    side: str = "image"

    def __init__(self) -> None:
        super().__init__()
        # A buffer follows .to(device) (Lightning moves the module), so parameter-free backbones know
        # their device too.
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise BackboneError(f"backbone={self.name} has no image features.")

    def text_features(self, captions: list[str]) -> torch.Tensor:
        raise BackboneError(f"backbone={self.name} has no text features (only clip/clip_text do).")

    def fingerprint(self) -> str:
        """Hash of the weights and preprocessing that decide this backbone's `side` features."""
        raise NotImplementedError


class PixelBackbone(FeatureBackbone):
    name = "pixel"

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.flatten(1).to(torch.float64)
        # Centred: a uniform brightness offset does not count towards the cosine.
        return (x - x.mean(dim=1, keepdim=True)).to(torch.float32)

    def fingerprint(self) -> str:
        return module_fingerprint(extra={"backbone": "pixel", "centred": True})


class _ProcessorMixin:
    processor: Any

    def _preprocess(self, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        batch = self.processor(images=_to_uint8_images(pixels), return_tensors="pt")
        return batch["pixel_values"].to(device)

    def _processor_config(self) -> dict[str, Any]:
        config = self.processor.to_dict()
        config.pop("processor_class", None)
        return config


class ClipBackbone(_ProcessorMixin, FeatureBackbone):
    """CLIP's projected embeddings (a whole CLIPModel folder: both towers, so that evaluation can ask
    a `clip_text` backbone for image features too)."""

    def __init__(self, path: Path, side: str = "image") -> None:
        super().__init__()
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.path = path
        self.side = side
        self.name = "clip" if side == "image" else "clip_text"
        self.clip = CLIPModel.from_pretrained(path, local_files_only=True).eval()
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = self.clip.vision_model(pixel_values=self._preprocess(pixels, self.device)).pooler_output
        return self.clip.visual_projection(pooled).float()

    @torch.no_grad()
    def text_features(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(captions),
            padding=True,
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).to(self.device)
        pooled = self.clip.text_model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
        ).pooler_output
        return self.clip.text_projection(pooled).float()

    def fingerprint(self) -> str:
        if self.side == "image":
            return module_fingerprint(
                self.clip.vision_model,
                self.clip.visual_projection,
                extra={"clip": "image", "processor": self._processor_config()},
            )
        vocab = self.tokenizer.get_vocab()
        return module_fingerprint(
            self.clip.text_model,
            self.clip.text_projection,
            extra={
                "clip": "text",
                "vocab": hash_json(sorted(vocab.items())),
                "max": self.tokenizer.model_max_length,
            },
        )


class ClsTokenBackbone(_ProcessorMixin, FeatureBackbone):
    """DINO (transformers ViTModel) or DINOv2 (Dinov2Model): the final CLS token (after the last
    layer norm), the image descriptor both papers use for retrieval."""

    def __init__(self, path: Path, name: str) -> None:
        super().__init__()
        from transformers import AutoImageProcessor, Dinov2Model, ViTModel

        self.name = name
        self.path = path
        if name == "dino":
            # DINO checkpoints have no pooler; without add_pooling_layer=False one would be made at random.
            self.model = ViTModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True)
        else:
            self.model = Dinov2Model.from_pretrained(path, local_files_only=True)
        self.model.eval()
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=self._preprocess(pixels, self.device))
        return out.last_hidden_state[:, 0].float()

    def fingerprint(self) -> str:
        return module_fingerprint(
            self.model, extra={"backbone": self.name, "processor": self._processor_config()}
        )


def load_backbone(
    name: str, path: str | Path | None = None, device: str | torch.device = "cpu"
) -> FeatureBackbone:
    """The backbone `name` (see BACKBONES) with weights from the local folder `path`, on `device`,
    in eval mode. Raises BackboneError naming the model to download when `path` is missing."""
    folder = check_backbone(name, path)
    if name == "pixel":
        backbone: FeatureBackbone = PixelBackbone()
    elif name in ("clip", "clip_text"):
        assert folder is not None
        backbone = ClipBackbone(folder, side="image" if name == "clip" else "text")
    else:
        assert folder is not None
        backbone = ClsTokenBackbone(folder, name)
    return backbone.to(device).eval()
