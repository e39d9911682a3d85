"""Train a text-to-image diffusion model from scratch: `python train.py [overrides]`.

Returns the last logged training loss (from logger=csv's metrics.csv; None with other loggers), the
metric a `-m` sweep of training settings minimises."""

import csv
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffusion_attribution.jobs.train import run_training


def last_train_loss(run_dir: Path) -> float | None:
    values = []
    for path in sorted(run_dir.glob("logs/**/metrics.csv")):
        with open(path, newline="") as f:
            values += [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    return values[-1] if values else None


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    checkpoint = run_training(cfg, run_dir)
    print(f"Checkpoint: {checkpoint}")
    return last_train_loss(run_dir)


if __name__ == "__main__":
    main()
