"""The customization job (`python train.py experiment=customize model.path=<base> data.exemplars=<folder>`):
Custom Diffusion on the base model, then the customized checkpoint folder (and its delta over the
base, `customization.safetensors`) in the run directory."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint

from ..data.customization import CustomizationDataModule
from ..models.loading import model_from_config
from ..models.pipeline import load_training_config
from ..modules.callbacks import ProgressLogCallback, SampleGridCallback
from ..modules.customization import CustomDiffusionModule

log = logging.getLogger(__name__)


def resolve_regularization(cfg: DictConfig) -> DictConfig:
    """`data.regularization=base`: the base checkpoint's own training data config."""
    if cfg.data.get("regularization") != "base":
        return cfg
    path = cfg.model.get("path")
    trained = load_training_config(path) if path else None
    if trained is None or trained.get("data") is None:
        raise ValueError(
            f"data.regularization=base needs the base model's training data, but {path} has no "
            "training_config.yaml with a data section: give data.regularization=<image folder> instead."
        )
    cfg = cfg.copy()
    with open_dict(cfg):
        base_data = trained.data.copy()
        base_data.resolution = cfg.data.resolution
        cfg.data.regularization = base_data
    return cfg


def run_customization(cfg: DictConfig, run_dir: str | Path) -> Path:
    from .train import resolve_resume

    run_dir = Path(run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    cfg = resolve_regularization(cfg)
    datamodule: CustomizationDataModule = hydra.utils.instantiate(cfg.data, _recursive_=False)
    regularization = datamodule.regularization_dataset
    log.info(
        "Customization: %d exemplars from %s, %s regularisation images",
        len(datamodule.source),
        datamodule.exemplar_root,
        len(regularization) if regularization is not None else "no",
    )
    model = model_from_config(cfg.model)
    settings = OmegaConf.to_container(cfg.customization, resolve=True)
    module = CustomDiffusionModule(model, max_steps=cfg.training.max_steps, **settings)
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            every_n_train_steps=cfg.training.checkpoint_every_n_steps,
            save_last=True,
            save_top_k=0,
        ),
        SampleGridCallback(out_dir=str(run_dir / "samples"), **cfg.samples),
        ProgressLogCallback(cfg.training.get("log_every_n_steps", 50)),
    ]
    loggers = [hydra.utils.instantiate(cfg.logger)] if cfg.get("logger") else []
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_resume(cfg.training.resume, run_dir))
    checkpoint = run_dir / "checkpoint"
    if trainer.is_global_zero:
        module.save_customized(checkpoint, config=cfg)
        log.info("Customized checkpoint written to %s (delta: customization.safetensors)", checkpoint)
    trainer.strategy.barrier()
    return checkpoint
