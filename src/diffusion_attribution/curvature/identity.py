"""`method/curvature=identity`: P = I, plain gradient ascent on the query's loss without the Fisher,
θ ← θ + α ∇L(ẑ) (the paper's ablation, which performs at chance). Nothing is fitted or cached."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from diffusion_attribution.curvature.base import Curvature
from diffusion_attribution.data.base import CaptionedImageDataset
from diffusion_attribution.models.pipeline import TextToImageModel


class IdentityCurvature(Curvature):
    name = "identity"
    needs_fit = False

    def __init__(self) -> None:
        super().__init__(damping=0.0)

    def settings(self) -> dict[str, Any]:
        return {"curvature": self.name}

    def fit(
        self,
        model: TextToImageModel,
        dataset: CaptionedImageDataset,
        ids: Sequence[int],
        params: str,
        out_dir: Path,
        identity: dict[str, Any],
        batch_size: int = 64,
        seed: int = 0,
        trainer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        pass

    def save(self, path: Path) -> None:
        pass

    def load(self, path: Path) -> None:
        pass

    def validate(self, params: Mapping[str, torch.Tensor]) -> None:
        pass

    def precondition(self, gradient: Mapping[str, torch.Tensor], num_train: float) -> dict[str, torch.Tensor]:
        return dict(gradient)
