"""The training job behind train.py: data + model + LightningModule + Trainer, then export the EMA
weights as a diffusers-style checkpoint folder (with the resolved config) in the run directory."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint

from ..data.base import CaptionedImageDataModule
from ..models.loading import model_from_config
from ..modules.callbacks import ProgressLogCallback, SampleGridCallback
from ..modules.keyed_training import ExampleKeyedTrainingModule, keyed_train_dataloader
from ..modules.training import DiffusionTrainingModule

log = logging.getLogger(__name__)


def resolve_resume(spec: str | None, run_dir: Path) -> str | None:
    """`training.resume`: null, a Lightning .ckpt path, or a run directory (its checkpoints/last.ckpt)."""
    if not spec:
        return None
    path = Path(spec)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(
            f"training.resume={spec}: no checkpoint at {path}. Give a .ckpt file or the run directory of "
            "the interrupted run (it holds checkpoints/last.ckpt)."
        )
    return str(path)


def run_training(cfg: DictConfig, run_dir: str | Path) -> Path:
    if cfg.get("customization") is not None:  # experiment=customize: Custom Diffusion on a base model
        from .customize import run_customization

        return run_customization(cfg, run_dir)
    run_dir = Path(run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    datamodule: CaptionedImageDataModule = hydra.utils.instantiate(cfg.data)
    excluded = datamodule.excluded_ids
    log.info(
        "Data: %d examples, %d excluded, %d used",
        datamodule.num_examples,
        len(excluded),
        len(datamodule.train_ids),
    )
    model = model_from_config(cfg.model, datamodule.source.all_captions())
    # training.example_keyed_rng: every random draw keyed by (seed, epoch, id), the data order by
    # (seed, epoch), positioned by the global step: exact resume, and leave-K-out retrains that share
    # the original's random numbers (modules/keyed_training.py).
    keyed = bool(cfg.training.get("example_keyed_rng", False))
    if keyed:
        module: DiffusionTrainingModule = ExampleKeyedTrainingModule(
            model, max_steps=cfg.training.max_steps, seed=cfg.seed, **cfg.training.optim
        )
    else:
        module = DiffusionTrainingModule(model, max_steps=cfg.training.max_steps, **cfg.training.optim)
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            every_n_train_steps=cfg.training.checkpoint_every_n_steps,
            save_last=True,
            save_top_k=-1 if cfg.training.get("keep_checkpoints") else 0,  # -1: keep every one (curves)
            filename="step_{step:06d}",
            auto_insert_metric_name=False,
        ),
        SampleGridCallback(out_dir=str(run_dir / "samples"), **cfg.samples),
        ProgressLogCallback(cfg.training.get("log_every_n_steps", 50)),
    ]
    loggers = [hydra.utils.instantiate(cfg.logger)] if cfg.get("logger") else []
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    resume = resolve_resume(cfg.training.resume, run_dir)
    if keyed:
        if trainer.num_devices * trainer.num_nodes > 1:
            raise ValueError(
                "training.example_keyed_rng=true runs on one device (its batches are positioned by the global "
                "step); leave-K-out parallelises over retrain jobs instead. Use trainer=cpu or trainer=gpu."
            )
        loader = keyed_train_dataloader(datamodule, cfg.seed)
        loader.bind(trainer)
        trainer.fit(module, train_dataloaders=loader, ckpt_path=resume)
    else:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    checkpoint = run_dir / "checkpoint"
    if trainer.is_global_zero:
        with module.ema_weights() as ema_model:
            ema_model.save_pretrained(checkpoint, config=cfg)
        log.info("Checkpoint (EMA weights) written to %s", checkpoint)
    trainer.strategy.barrier()  # other ranks return only once the checkpoint exists
    return checkpoint


def export_lightning_checkpoint(cfg: DictConfig, ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """A periodic Lightning checkpoint of a run -> a diffusers-style checkpoint folder of its EMA
    weights (what the run would have exported had it stopped there). Loaded with weights_only=True."""
    datamodule: CaptionedImageDataModule = hydra.utils.instantiate(cfg.data)
    model = model_from_config(cfg.model, datamodule.source.all_captions())
    module = DiffusionTrainingModule(model, max_steps=cfg.training.max_steps, **cfg.training.optim)
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])
    module.on_load_checkpoint(state)
    with module.ema_weights() as ema_model:
        ema_model.save_pretrained(out_dir, config=cfg)
    return Path(out_dir)
