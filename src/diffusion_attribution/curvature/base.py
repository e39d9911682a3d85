"""The curvature interface: the preconditioner P of the unlearning step θ ← θ + α P⁻¹ ∇θ L(ẑ).

A curvature is chosen by the config group `method/curvature` (conf/method/curvature/<name>.yaml) and
lives in one file of this package. Its life cycle, driven by the unlearning attributor:

    curvature.fit(model, dataset, ids, params, out_dir, identity, ...)  # over the training set, sharded
    curvature.save(path) / curvature.load(path)                         # cached, keyed by `settings()`
    curvature.validate(selected)                                        # fitted for these weights?
    curvature.precondition(gradient, num_train)                         # P⁻¹ g, by parameter name

`settings()` names what decides the fitted numbers (it enters the cache key); the damping is applied
at `precondition` time, so one cached fit serves every damping. The damping λ is relative to the
curvature's own scale: `damping_scope=global` takes one λ = damping · mean over every selected layer
(the paper's AbU); `layer` gives each layer its own λ_l = damping · mean over that layer (FastGDA's
AbU+ rule), which matters when layers differ in scale (e.g. cross-attention K against V). A curvature without factors (the
identity) says so with `needs_fit = False`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from diffusion_attribution.data.base import CaptionedImageDataset
from diffusion_attribution.models.pipeline import TextToImageModel


class FisherError(ValueError):
    """A fitted curvature that cannot be used (non-finite, all zero, or made for other weights)."""


class Curvature(ABC):
    """A preconditioner of the unlearning step. Subclasses set `name` and implement the abstract
    methods; `damping` is relative to the curvature's own scale (see each subclass)."""

    name: ClassVar[str] = "curvature"
    needs_fit: ClassVar[bool] = True

    SCOPES = ("global", "layer")

    def __init__(
        self, damping: float = 0.1, samples_per_example: int = 1, damping_scope: str = "global"
    ) -> None:
        if damping_scope not in self.SCOPES:
            raise ValueError(
                f"Unknown method.curvature.damping_scope={damping_scope!r}; options: {self.SCOPES} (global: one "
                "λ relative to the mean over every selected layer; layer: each layer's own mean)."
            )
        if not damping >= 0:
            raise ValueError(f"method.curvature.damping must be >= 0, got {damping}.")
        if int(samples_per_example) < 1:
            raise ValueError(
                f"method.curvature.samples_per_example must be at least 1, got {samples_per_example}."
            )
        self.damping = float(damping)
        self.samples_per_example = int(samples_per_example)
        self.damping_scope = damping_scope

    def settings(self) -> dict[str, Any]:
        """What decides the fitted numbers (part of the cache key; the damping is not)."""
        return {"curvature": self.name, "samples_per_example": self.samples_per_example}

    def describe(self) -> dict[str, Any]:
        """The settings that decide the preconditioned step (written into ranking.json)."""
        return {**self.settings(), "damping": self.damping, "damping_scope": self.damping_scope}

    @abstractmethod
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
        """Fit over the training examples `ids` of `dataset` for the weight subset `params`, as a sharded
        resumable run under `out_dir` (`identity` says what made the numbers)."""

    @abstractmethod
    def save(self, path: Path) -> None: ...

    @abstractmethod
    def load(self, path: Path) -> None: ...

    @abstractmethod
    def validate(self, params: Mapping[str, torch.Tensor]) -> None:
        """Raise FisherError unless the fitted factors cover exactly these weights, finite."""

    @abstractmethod
    def precondition(self, gradient: Mapping[str, torch.Tensor], num_train: float) -> dict[str, torch.Tensor]:
        """P⁻¹ g by parameter name (float32, on the gradient's device)."""

    def default_num_train(self) -> float | None:
        """N in the step, as recorded by the fit (None when the fit does not know it)."""
        return None


class Factors(Protocol):
    """What a fitted curvature keeps: saved and checked as one file, with the fit's metadata."""

    metadata: dict[str, Any]

    def save(self, path: str | Path) -> Path: ...

    def validate(self, params: Mapping[str, torch.Tensor] | None = None) -> Any: ...


class FittedCurvature(Curvature):
    """A curvature whose fit is one `Factors` object (the diagonal Fisher, the EK-FAC factors): a
    subclass says how to fit (`run_fit`, a sharded run over the training set) and load (`load_factors`)."""

    def __init__(
        self, damping: float = 0.1, samples_per_example: int = 1, damping_scope: str = "global"
    ) -> None:
        super().__init__(damping, samples_per_example, damping_scope)
        self.factors: Any = None

    @classmethod
    def from_factors(cls, factors: Factors, **settings: Any) -> FittedCurvature:
        """This curvature with already computed factors (e.g. from `compute_fisher` or `compute_ekfac`)."""
        curvature = cls(**settings)
        curvature.factors = factors
        return curvature

    @staticmethod
    @abstractmethod
    def run_fit(
        model: TextToImageModel,
        dataset: CaptionedImageDataset,
        ids: Sequence[int],
        params: str,
        out_dir: Path,
        identity: dict[str, Any],
        **settings: Any,
    ) -> Factors: ...

    @staticmethod
    @abstractmethod
    def load_factors(path: Path) -> Factors: ...

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
        self.factors = self.run_fit(
            model,
            dataset,
            ids,
            params,
            out_dir,
            identity,
            batch_size=batch_size,
            seed=seed,
            samples_per_example=self.samples_per_example,
            trainer_kwargs=trainer_kwargs,
        )

    def save(self, path: Path) -> None:
        self._fitted().save(path)

    def load(self, path: Path) -> None:
        self.factors = self.load_factors(path)

    def _fitted(self) -> Any:
        if self.factors is None:
            raise FisherError(f"The {self.name} curvature has not been fitted or loaded yet.")
        return self.factors

    def validate(self, params: Mapping[str, torch.Tensor]) -> None:
        self._fitted().validate(params)

    def default_num_train(self) -> float | None:
        num = self._fitted().metadata.get("num_examples")
        return None if num is None else float(num)
