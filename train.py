"""Train a text-to-image diffusion model from scratch: `python train.py [overrides]`."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffusion_attribution.jobs.train import run_training


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    checkpoint = run_training(cfg, HydraConfig.get().runtime.output_dir)
    print(f"Checkpoint: {checkpoint}")


if __name__ == "__main__":
    main()
