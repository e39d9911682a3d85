"""Shared fixtures: composed configs (the real conf/ tree), a tiny shapes world and the tiny model.

Everything here is sized for two CPU cores: a 96-image world (64 common + 4 per rare concept) and the
`model=tiny` settings read from conf/model/tiny.yaml (never duplicated here).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion_attribution.data.shapes import ShapesDataModule
from diffusion_attribution.models.build import build_tiny_model
from diffusion_attribution.models.pipeline import TextToImageModel

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
TINY_WORLD = {"num_common": 64, "images_per_rare_concept": 4}
# Overrides that make `python train.py` / run_training finish in seconds on the tiny world.
FAST_TRAIN = [
    "data.num_common=64",
    "data.images_per_rare_concept=4",
    "data.batch_size=8",
    "training.max_steps=4",
    "training.checkpoint_every_n_steps=2",
    "training.optim.warmup_steps=2",
    "samples.every_n_steps=2",
    "samples.num_steps=2",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "logger=csv",
]

# One thread: deterministic, and on a shared 2-core machine two OpenMP threads that get preempted wait
# on each other (measured: a small conv 20x slower with 2 threads than with 1 under load).
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def compose_train(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """`conf/train.yaml` composed as `python train.py <overrides>` would (minus the run itself)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def set_hydra_run(cfg: DictConfig, run_dir: str | Path) -> DictConfig:
    """Make `cfg` (composed with its hydra node) the current Hydra run writing to `run_dir`, so that
    `${hydra:runtime.output_dir}` resolves as in a real run; return the job config without `hydra`."""
    cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    job = copy.deepcopy(cfg)
    with open_dict(job):
        del job["hydra"]
    return job


def plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


@pytest.fixture
def hydra_run(tmp_path: Path) -> Iterator[Any]:
    """`hydra_run(overrides, run_dir=None) -> cfg`: a job config whose Hydra run dir is set (default
    tmp_path/run); the global HydraConfig is cleared afterwards."""

    def make(overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> DictConfig:
        cfg = compose_train(overrides, return_hydra_config=True)
        return set_hydra_run(cfg, run_dir or tmp_path / "run")

    yield make
    HydraConfig.instance().cfg = None


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache dir for the session: each tiny world is generated once."""
    return tmp_path_factory.mktemp("shapes_cache")


@pytest.fixture
def make_shapes(shapes_cache: Path) -> Any:
    """`make_shapes(**overrides) -> ShapesDataModule` on the tiny world, batch 8."""

    def make(**overrides: Any) -> ShapesDataModule:
        settings = {**TINY_WORLD, "cache_dir": str(shapes_cache), "batch_size": 8, **overrides}
        return ShapesDataModule(**settings)

    return make


@pytest.fixture
def shapes(make_shapes: Any) -> ShapesDataModule:
    return make_shapes()


@pytest.fixture(scope="session")
def tiny_model_settings() -> dict[str, Any]:
    """conf/model/tiny.yaml as build_tiny_model keyword arguments."""
    model_cfg = plain(compose_train(["model=tiny"]).model)
    return {k: v for k, v in model_cfg.items() if k not in ("_target_", "_partial_", "path")}


@pytest.fixture
def make_tiny_model(tiny_model_settings: dict[str, Any], shapes: ShapesDataModule) -> Any:
    """`make_tiny_model(seed=0) -> TextToImageModel` (fresh, in train mode) with the tiny world's
    vocabulary; the same seed gives the same weights."""

    def make(seed: int = 0) -> TextToImageModel:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_tiny_model(captions=shapes.source.all_captions(), **tiny_model_settings)

    return make


@pytest.fixture
def tiny_model(make_tiny_model: Any) -> TextToImageModel:
    return make_tiny_model()
