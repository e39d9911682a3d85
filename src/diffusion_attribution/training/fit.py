"""The fit helper every trainer of the project shares: train.py (from scratch, leave-K-out retrains),
the customization (Custom Diffusion) and the embedded AbC builder. Each builds its LightningModule and
data; `fit_and_export` runs the Trainer (resuming from `training.resume`), then exports the result as a
diffusers-style checkpoint folder on the main process only."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.data.customization import CustomizationDataModule
from diffusion_attribution.models.loading import model_from_config
from diffusion_attribution.models.pipeline import load_training_config
from diffusion_attribution.training.callbacks import ProgressLogCallback, SampleGridCallback
from diffusion_attribution.training.customization import CustomDiffusionModule
from diffusion_attribution.training.keyed import ExampleKeyedTrainingModule, keyed_train_dataloader
from diffusion_attribution.training.module import DiffusionTrainingModule
from diffusion_attribution.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "train_config.json"

# Keys that may differ between a run and its resumption (where to resume from is not what is trained).
RESUMABLE_DIFFERENCES = ("training.resume",)


class RunDirectoryError(ValueError):
    """A training run pointed at a run directory that holds another run's checkpoints."""


def check_max_steps(cfg: DictConfig) -> None:
    steps = cfg.training.get("max_steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(
            f"training.max_steps={steps!r}: training needs at least one optimizer step (a positive "
            "integer), or it would export an untrained checkpoint. Set training.max_steps=<steps>, e.g. "
            "training.max_steps=4000."
        )


def _config_record(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without the keys a resumption may change, and its sha256."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # interpolations that only resolve inside a Hydra app (${hydra:...})
        plain = OmegaConf.to_container(cfg, resolve=False)
    plain = json.loads(json.dumps(plain, default=str, sort_keys=True))
    for dotted in RESUMABLE_DIFFERENCES:
        *parents, leaf = dotted.split(".")
        node = plain
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    digest = hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "config": plain}


def _flat_differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            name = f"{where}.{key}" if where else key
            if key not in old:
                out.append(f"{name}: (absent) -> {new[key]!r}")
            elif key not in new:
                out.append(f"{name}: {old[key]!r} -> (absent)")
            else:
                out += _flat_differences(old[key], new[key], name)
        return out
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def claim_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse a run directory that already holds checkpoints of a run with another config (it would be
    overwritten); otherwise record this run's config in `<run_dir>/train_config.json`. The same config
    (training.resume aside) may resume or redo its own run."""
    record = _config_record(cfg)
    record_path = run_dir / RUN_CONFIG_FILE
    outputs = [run_dir / name for name in ("checkpoint", "checkpoints") if (run_dir / name).exists()]
    fix = (
        "Give this run its own directory (hydra.run.dir=<new folder>), or rerun with the config recorded "
        f"there to resume it (training.resume={run_dir})."
    )
    if outputs:
        if record_path.is_file():
            try:
                existing = json.loads(record_path.read_text())
            except ValueError as error:
                raise RunDirectoryError(
                    f"{record_path} is not readable JSON ({error}): the run in {run_dir} cannot be "
                    f"identified. {fix}"
                ) from error
            if existing.get("sha256") != record["sha256"]:
                changed = _flat_differences(existing.get("config", {}), record["config"])
                shown = "; ".join(changed[:12]) + (
                    f"; ... ({len(changed) - 12} more)" if len(changed) > 12 else ""
                )
                raise RunDirectoryError(
                    f"{run_dir} already holds {', '.join(p.name for p in outputs)} of a run with another "
                    f"config (differs in: {shown or 'the config hash'}); refusing to overwrite it. {fix}"
                )
        else:
            raise RunDirectoryError(
                f"{run_dir} already holds {', '.join(p.name for p in outputs)} but no {RUN_CONFIG_FILE}, so "
                f"the run that wrote them cannot be compared with this one; refusing to overwrite them. {fix}"
            )
    if rank_zero_only.rank == 0:  # every process checks; one writes (the others start with the same config)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record_path, json.dumps(record, indent=2, sort_keys=True))


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


def run_trainer(cfg: DictConfig, run_dir: Path, keep_checkpoints: bool = False) -> pl.Trainer:
    """The configured Trainer with the project's callbacks (periodic Lightning checkpoints for resuming,
    sample grids, progress lines) and loggers."""
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            every_n_train_steps=cfg.training.checkpoint_every_n_steps,
            save_last=True,
            save_top_k=-1 if keep_checkpoints else 0,  # -1: keep every one (quality-vs-time curves)
            filename="step_{step:06d}",
            auto_insert_metric_name=False,
        ),
        SampleGridCallback(out_dir=str(run_dir / "samples"), **cfg.samples),
        ProgressLogCallback(cfg.training.get("log_every_n_steps", 50)),
    ]
    loggers = [hydra.utils.instantiate(cfg.logger)] if cfg.get("logger") else []
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)


def fit_and_export(
    module: pl.LightningModule,
    trainer: pl.Trainer,
    checkpoint: Path,
    export: Callable[[Path], Any],
    resume: str | None = None,
    **data: Any,
) -> Path:
    """Fit `module` (`data`: datamodule= or train_dataloaders=), then `export(checkpoint)` (the folder to
    write) on the main process; the other processes return once it exists."""
    trainer.fit(module, ckpt_path=resume, **data)
    if trainer.is_global_zero:
        export(checkpoint)
        log.info("Checkpoint written to %s", checkpoint)
    trainer.strategy.barrier()
    return checkpoint


def train_model(cfg: DictConfig, run_dir: str | Path) -> Path:
    """train.py: data + model + DiffusionTrainingModule + Trainer, then the EMA weights as a checkpoint
    folder (with the resolved config) in the run directory."""
    run_dir = Path(run_dir)
    check_max_steps(cfg)
    claim_run_dir(cfg, run_dir)
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
    # the original's random numbers (training/keyed.py).
    keyed = bool(cfg.training.get("example_keyed_rng", False))
    if keyed:
        module: DiffusionTrainingModule = ExampleKeyedTrainingModule(
            model, max_steps=cfg.training.max_steps, seed=cfg.seed, **cfg.training.optim
        )
    else:
        module = DiffusionTrainingModule(model, max_steps=cfg.training.max_steps, **cfg.training.optim)
    trainer = run_trainer(cfg, run_dir, keep_checkpoints=bool(cfg.training.get("keep_checkpoints")))
    resume = resolve_resume(cfg.training.resume, run_dir)

    def export(checkpoint: Path) -> None:
        with module.ema_weights() as ema_model:
            ema_model.save_pretrained(checkpoint, config=cfg)

    if not keyed:
        return fit_and_export(module, trainer, run_dir / "checkpoint", export, resume, datamodule=datamodule)
    if trainer.num_devices * trainer.num_nodes > 1:
        raise ValueError(
            "training.example_keyed_rng=true runs on one device (its batches are positioned by the global "
            "step); leave-K-out parallelises over retrain jobs instead. Use trainer=cpu or trainer=gpu."
        )
    loader = keyed_train_dataloader(datamodule, cfg.seed)
    loader.bind(trainer)
    return fit_and_export(module, trainer, run_dir / "checkpoint", export, resume, train_dataloaders=loader)


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


def customize_model(cfg: DictConfig, run_dir: str | Path) -> Path:
    """`train.py experiment=customize`: Custom Diffusion on the base model, then the customized checkpoint
    folder (and its delta over the base, customization.safetensors) in the run directory."""
    run_dir = Path(run_dir)
    check_max_steps(cfg)
    claim_run_dir(cfg, run_dir)
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
    trainer = run_trainer(cfg, run_dir)
    resume = resolve_resume(cfg.training.resume, run_dir)
    return fit_and_export(
        module,
        trainer,
        run_dir / "checkpoint",
        lambda checkpoint: module.save_customized(checkpoint, config=cfg),
        resume,
        datamodule=datamodule,
    )


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
