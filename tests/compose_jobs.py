"""Compose the real attribute.yaml / evaluate.yaml (as `python attribute.py <overrides>` would) for
tests that call the jobs in-process; the counterpart of conftest.compose_train for the other apps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from conftest import CONF_DIR, set_hydra_run
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig


def compose_job(config_name: str, overrides: Sequence[str], run_dir: str | Path) -> DictConfig:
    """The job config of `config_name` with `overrides`, its Hydra run directory set to `run_dir` (so
    `${hydra:runtime.output_dir}` resolves). Clear it with `HydraConfig.instance().cfg = None`."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    return set_hydra_run(cfg, run_dir)
