"""Callbacks for training runs: sample grids for fixed prompts at intervals."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

from ..models.sampling import generate
from ..utils.images import image_grid, to_uint8
from .training import DiffusionTrainingModule


class SampleGridCallback(pl.Callback):
    """Every `every_n_steps` (and at the end), generate the fixed prompts with the EMA weights, save
    a PNG grid under `<run dir>/samples/` and send it to the logger (W&B or TensorBoard)."""

    def __init__(
        self,
        prompts: Sequence[str],
        out_dir: str,
        every_n_steps: int = 500,
        seeds: Sequence[int] | None = None,
        num_steps: int = 30,
        guidance_scale: float = 3.0,
    ) -> None:
        self.prompts = list(prompts)
        self.seeds = list(seeds) if seeds is not None else list(range(len(self.prompts)))
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale

    def _sample(self, trainer: pl.Trainer, module: DiffusionTrainingModule) -> None:
        if not self.prompts or not trainer.is_global_zero:
            return
        with module.ema_weights() as model:
            samples = generate(model, self.prompts, self.seeds, self.num_steps, self.guidance_scale)
        step = trainer.global_step
        grid = image_grid(samples.images, ncol=min(8, len(self.prompts)))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        grid.save(self.out_dir / f"step_{step:06d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples", [np.asarray(grid)], step=step, caption=[f"step {step}"])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_images("samples", to_uint8(samples.images), step, dataformats="NHWC")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self._sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        self._sample(trainer, pl_module)
