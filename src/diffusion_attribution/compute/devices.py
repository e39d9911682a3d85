"""The one device decision of a job, read from its trainer config, so that no step of a job silently
runs on another device than the Lightning loops of the same job."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def device_from_trainer(trainer: Mapping[str, Any] | None) -> torch.device:
    """trainer=cpu (or no trainer config) keeps everything on the CPU even where a GPU is visible;
    trainer=gpu needs one and says so when none is visible; accelerator=auto takes a GPU if present."""
    accelerator = str((trainer or {}).get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"trainer.accelerator={accelerator} but no CUDA device is visible: use trainer=cpu, or run on a "
                "machine with a GPU."
            )
        return torch.device("cuda")
    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if accelerator != "cpu":
        raise ValueError(f"trainer.accelerator={accelerator!r} is not one of cpu, gpu, cuda, auto.")
    return torch.device("cpu")
