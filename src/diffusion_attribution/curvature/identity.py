"""`method/curvature=identity`: P = I, plain gradient ascent on the query's loss without the Fisher,
θ ← θ + α ∇L(ẑ) (the paper's ablation, which performs at chance). Nothing is fitted or cached."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from diffusion_attribution.curvature.base import Curvature


class IdentityCurvature(Curvature):
    name = "identity"
    needs_fit = False

    def __init__(self) -> None:
        super().__init__(damping=0.0)

    def settings(self) -> dict[str, Any]:
        return {"curvature": self.name}

    def fit(self, *args: Any, **kwargs: Any) -> None:  # nothing to fit
        pass

    def save(self, path: Path) -> None:
        pass

    def load(self, path: Path) -> None:
        pass

    def validate(self, params: Mapping[str, torch.Tensor]) -> None:
        pass

    def precondition(self, gradient: Mapping[str, torch.Tensor], num_train: float) -> dict[str, torch.Tensor]:
        return dict(gradient)
