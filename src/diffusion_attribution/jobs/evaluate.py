"""The job behind evaluate.py: every benchmark config is a partial function (cfg, run_dir) -> summary,
so a new benchmark is one module and one file in conf/benchmark/."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def headline_metric(summary: Any) -> float | None:
    """A benchmark summary's headline metric (its "headline" entry, evaluation/report.py with_headline),
    what evaluate.py returns to a sweeper; None for summaries without one."""
    headline = summary.get("headline") if isinstance(summary, dict) else None
    if isinstance(headline, dict) and headline.get("value") is not None:
        return float(headline["value"])
    return None


def run_benchmark(cfg: DictConfig, run_dir: str | Path) -> Any:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    benchmark = hydra.utils.instantiate(cfg.benchmark)
    summary = benchmark(cfg, run_dir)
    log.info("Results in %s", run_dir)
    print(f"Results: {run_dir}")
    return summary
