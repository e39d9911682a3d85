"""Custom Diffusion training (Kumari et al., CVPR 2023), the customization behind the AbC benchmark:
the new tokens' embedding rows and a UNet weight subset train on a handful of exemplars (optionally
with regularisation images in every batch); every other weight stays bit-identical. The weights'
formats (the delta file, the released AbC files) are in models/customization.py."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from diffusion_attribution.models.customization import (
    DELTA_FILE,
    add_concept_tokens,
    save_customization_delta,
    token_embedding_table,
)
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.models.weight_subsets import select_parameters
from diffusion_attribution.objective.loss import diffusion_loss, min_snr_weights
from diffusion_attribution.training.module import warmup_cosine
from diffusion_attribution.utils.fingerprint import model_fingerprint


# ------------------------------------------------------------------------------------------ training
def noise_prediction_loss(
    model: TextToImageModel, pixels: torch.Tensor, captions: list[str], min_snr_gamma: float | None = None
) -> torch.Tensor:
    """Per-example training loss [B] at random timesteps and noise (the training recipe's loss)."""
    latents = model.encode_images(pixels)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(
        0, model.scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
    )
    weights = None if min_snr_gamma is None else min_snr_weights(model, timesteps, min_snr_gamma)
    return diffusion_loss(model, latents, noise, timesteps, model.encode_text(captions), weights=weights)


class CustomDiffusionModule(pl.LightningModule):
    """Fine-tune a base model toward a concept: the new tokens' embedding rows and the UNet's
    `params` subset (cross-attention K/V by default) train; everything else is frozen bit-exactly.

    Batches are `{"exemplars": batch, "regularization": batch}` (the second optional): the loss is the
    exemplars' mean loss plus `prior_loss_weight` times the regularisation images' mean loss.
    """

    def __init__(
        self,
        model: TextToImageModel,
        max_steps: int,
        tokens: Sequence[str] = ("<new1>",),
        initializer_words: Sequence[str | None] | None = None,
        params: str = "kv",
        lr: float = 1e-3,
        embedding_lr: float | None = None,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        min_lr_ratio: float = 1.0,
        prior_loss_weight: float = 1.0,
        caption_dropout: float = 0.0,
        min_snr_gamma: float | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.max_steps = max_steps
        self.params = params
        self.lr = lr
        self.embedding_lr = lr if embedding_lr is None else embedding_lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.prior_loss_weight = prior_loss_weight
        self.caption_dropout = caption_dropout
        self.min_snr_gamma = min_snr_gamma
        self.base_fingerprint = model_fingerprint(model)
        self.tokens = [str(t) for t in tokens]
        self.token_ids = add_concept_tokens(model, self.tokens, initializer_words)
        # Loaded models come in eval mode and Lightning keeps a module's mode at the start of fit (it
        # warns "Found N module(s) in eval mode"); train as Custom Diffusion does, in train mode.
        model.train()
        model.unet.requires_grad_(False)
        model.text_encoder.requires_grad_(False)
        if model.vae is not None:
            model.vae.requires_grad_(False).eval()  # frozen encoder: as at inference
        self.trained_unet = select_parameters(model.unet, params)
        for param in self.trained_unet.values():
            param.requires_grad_(True)
        embedding = token_embedding_table(model).weight
        embedding.requires_grad_(True)
        rows = torch.zeros(embedding.shape[0], dtype=torch.bool)
        rows[self.token_ids] = True
        self.register_buffer("token_rows", rows, persistent=False)
        # The other rows as they were: restored after every step so they stay bit-identical.
        self.register_buffer("frozen_rows", embedding.detach().clone(), persistent=False)
        embedding.register_hook(self._mask_embedding_gradient)

    def _mask_embedding_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.token_rows.to(grad.device, grad.dtype)[:, None]

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.trained_unet.values()
        yield token_embedding_table(self.model).weight

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        exemplars = batch["exemplars"] if "exemplars" in batch else batch
        captions = [
            "" if self.caption_dropout and torch.rand(()).item() < self.caption_dropout else c
            for c in exemplars["caption"]
        ]
        loss = noise_prediction_loss(
            self.model, exemplars["pixel_values"], captions, self.min_snr_gamma
        ).mean()
        self.log("train/exemplar_loss", loss, batch_size=len(captions))
        regularization = batch.get("regularization") if isinstance(batch, dict) else None
        if regularization is not None and self.prior_loss_weight > 0:
            prior = noise_prediction_loss(
                self.model,
                regularization["pixel_values"],
                list(regularization["caption"]),
                self.min_snr_gamma,
            ).mean()
            self.log("train/prior_loss", prior, batch_size=len(regularization["caption"]))
            loss = loss + self.prior_loss_weight * prior
        self.log("train/loss", loss, prog_bar=True, batch_size=len(captions))
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.restore_frozen_rows()

    def restore_frozen_rows(self) -> None:
        weight = token_embedding_table(self.model).weight
        with torch.no_grad():
            keep = ~self.token_rows.to(weight.device)
            weight[keep] = self.frozen_rows.to(weight.device)[keep]

    def configure_optimizers(self) -> dict[str, Any]:
        groups = [
            {"params": list(self.trained_unet.values()), "lr": self.lr, "weight_decay": self.weight_decay},
            # No weight decay on the table: AdamW's decay would shrink every row, not only the new one.
            {
                "params": [token_embedding_table(self.model).weight],
                "lr": self.embedding_lr,
                "weight_decay": 0.0,
            },
        ]
        optimizer = torch.optim.AdamW(groups)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.warmup_steps, self.max_steps, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @contextmanager
    def ema_weights(self) -> Iterator[TextToImageModel]:
        """The model as trained (Custom Diffusion keeps no EMA); lets the training callbacks sample."""
        yield self.model

    def save_customized(self, path: str | Path, config: Any = None) -> Path:
        """The full checkpoint folder plus `customization.safetensors` (the delta over the base)."""
        path = Path(path)
        self.model.save_pretrained(path, config=config)
        save_customization_delta(
            self.model, path / DELTA_FILE, self.tokens, self.params, self.base_fingerprint
        )
        (path / "customization.json").write_text(
            json.dumps(
                {
                    "tokens": self.tokens,
                    "token_ids": self.token_ids,
                    "params": self.params,
                    "base_model": self.base_fingerprint,
                },
                indent=2,
            )
        )
        return path
