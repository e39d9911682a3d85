"""Callbacks for training runs: sample grids for fixed prompts at intervals."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

from diffusion_attribution.models.sampling import generate
from diffusion_attribution.training.module import DiffusionTrainingModule
from diffusion_attribution.utils.images import image_grid, to_uint8

logger = logging.getLogger(__name__)

log = logging.getLogger(__name__)


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


class ProgressLogCallback(pl.Callback):
    """A log line every `every_n_steps` (step, loss, speed, time left): progress for runs whose
    output goes to a file (SLURM, nohup), where a progress bar shows nothing."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps
        self._start: float | None = None
        self._start_step = 0

    def on_train_start(self, trainer, pl_module) -> None:  # type: ignore[override]
        self._start, self._start_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        step = trainer.global_step
        if (
            self.every_n_steps <= 0
            or step % self.every_n_steps
            or not trainer.is_global_zero
            or self._start is None
        ):
            return
        elapsed = time.perf_counter() - self._start
        rate = (step - self._start_step) / max(elapsed, 1e-9)
        loss = trainer.callback_metrics.get("train/loss")
        left = (trainer.max_steps - step) / rate if trainer.max_steps > 0 and rate > 0 else float("nan")
        log.info(
            "step %d/%d  loss %.4f  %.2f steps/s  %.1f min elapsed, %.1f min left",
            step,
            trainer.max_steps,
            float(loss) if loss is not None else float("nan"),
            rate,
            elapsed / 60,
            left / 60,
        )
