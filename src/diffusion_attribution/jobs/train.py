"""The job behind train.py: a model trained from scratch (or, with experiment=customize, a Custom
Diffusion customization of a base model), exported as a checkpoint folder in the run directory."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from diffusion_attribution.training.fit import customize_model, train_model


def run_training(cfg: DictConfig, run_dir: str | Path) -> Path:
    if cfg.get("customization") is not None:  # experiment=customize
        return customize_model(cfg, run_dir)
    return train_model(cfg, run_dir)
