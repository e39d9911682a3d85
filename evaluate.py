"""Evaluate a model or an attribution: `python evaluate.py benchmark=<name> [overrides]`."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffusion_attribution.jobs.evaluate import run_benchmark


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_benchmark(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
