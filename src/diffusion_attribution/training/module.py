"""Training a text-to-image diffusion model from scratch (and, with `data.exclude`, leave-K-out
retraining: the length is in optimizer steps, so both see exactly the same number of updates)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from diffusers.training_utils import EMAModel
from torch import nn

from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.objective.loss import diffusion_loss, min_snr_weights


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear warm-up, then cosine decay to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class DiffusionTrainingModule(pl.LightningModule):
    """Noise-prediction training with caption dropout (for classifier-free guidance), AdamW,
    warm-up + cosine LR, EMA weights and the text encoder trained jointly when the model allows."""

    def __init__(
        self,
        model: TextToImageModel,
        max_steps: int,
        lr: float = 1e-3,
        text_encoder_lr: float | None = None,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        caption_dropout: float = 0.1,
        ema_decay: float = 0.999,
        ema_power: float = 0.75,
        min_snr_gamma: float | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.max_steps = max_steps
        self.lr = lr
        self.text_encoder_lr = lr if text_encoder_lr is None else text_encoder_lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.caption_dropout = caption_dropout
        self.min_snr_gamma = min_snr_gamma
        self.train_text_encoder = getattr(model, "train_text_encoder", True)
        model.text_encoder.requires_grad_(self.train_text_encoder)
        # A model loaded from a folder comes in eval mode and Lightning keeps it; the trained parts train
        # in train mode, a frozen text encoder runs as at inference.
        model.unet.train()
        model.text_encoder.train(self.train_text_encoder)
        # EMA with warm-up (decay grows as 1 - (1 + step)^-power up to ema_decay): early averages are
        # not dominated by the random initialisation, which matters for runs of a few thousand steps.
        self.ema = EMAModel(
            list(self.trainable_parameters()),
            decay=ema_decay,
            use_ema_warmup=True,
            inv_gamma=1.0,
            power=ema_power,
        )

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.model.unet.parameters()
        if self.train_text_encoder:
            yield from self.model.text_encoder.parameters()

    def training_randomness(
        self, batch: dict[str, Any], latents: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The random draws of one step: noise, timesteps and the captions after caption dropout.
        Drawn from the global torch RNG here; a subclass may key them per example instead
        (training/keyed.py, for leave-K-out retrains that resume bit-exactly)."""
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, self.model.scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
        )
        captions = [
            "" if torch.rand(()).item() < self.caption_dropout else caption for caption in batch["caption"]
        ]
        return noise, timesteps, captions

    def training_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        model = self.model
        latents = model.encode_images(batch["pixel_values"])
        noise, timesteps, captions = self.training_randomness(batch, latents)
        weights = (
            None if self.min_snr_gamma is None else min_snr_weights(model, timesteps, self.min_snr_gamma)
        )
        return diffusion_loss(
            model, latents, noise, timesteps, model.encode_text(captions), weights=weights
        ).mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # The EMA follows the optimizer, not the batch-end hooks: callbacks (checkpointing, sample
        # grids) run before the module's on_train_batch_end and would see an average one step behind.
        super().optimizer_step(*args, **kwargs)
        self.ema.to(self.device)
        self.ema.step(self.trainable_parameters())
        self.log("train/ema_decay", self.ema.cur_decay_value, batch_size=1)

    def configure_optimizers(self) -> dict[str, Any]:
        groups = [{"params": list(self.model.unet.parameters()), "lr": self.lr}]
        if self.train_text_encoder:
            groups.append({"params": list(self.model.text_encoder.parameters()), "lr": self.text_encoder_lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.warmup_steps, self.max_steps, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @contextmanager
    def ema_weights(self) -> Iterator[TextToImageModel]:
        """Temporarily swap the EMA weights into the model (for sampling and export)."""
        params = list(self.trainable_parameters())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield self.model
        finally:
            self.ema.restore(params)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
