"""Short content hashes that key cached per-model artifacts by what made them."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn


def hash_json(obj: Any, length: int = 16) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def module_fingerprint(*modules: nn.Module | None, extra: Any = None, length: int = 16) -> str:
    """Hash of the parameter and buffer bytes of the modules (names included), plus `extra`."""
    digest = hashlib.sha1()
    for k, module in enumerate(modules):
        if module is None:
            continue
        for name, tensor in module.state_dict().items():
            digest.update(f"{k}:{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:length]


def model_fingerprint(model: Any) -> str:
    """A TextToImageModel's weights (UNet, text encoder, VAE) and scheduler config."""
    return module_fingerprint(model.unet, model.text_encoder, model.vae, extra=dict(model.scheduler.config))


def data_fingerprint(datamodule: Any) -> str:
    """The data as a model sees it: every example's file name and captions, the resolution, and the
    source's content key (the pixels, where names and captions do not decide them: image folders and
    the AbC pool hash their files' bytes, data/folder.py `content_key_of_files`, so an image edited in
    place under the same name gives another fingerprint; the shapes world is keyed by its config)."""
    source = datamodule.source
    digest = hashlib.sha1(f"{type(source).__name__}:{len(source)}:{datamodule.resolution}".encode())
    digest.update(source.content_key().encode())
    for idx in range(len(source)):
        digest.update(source.file_name(idx).encode())
        digest.update("\x1f".join(source.captions(idx)).encode())
    return digest.hexdigest()[:16]
