"""Attribute generated (or given) images to training data:
`python attribute.py model.path=<checkpoint> query.prompts='[...]' query.seeds='[...]' [method=...]`."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffusion_attribution.jobs.attribute import run_attribution


@hydra.main(version_base="1.3", config_path="conf", config_name="attribute")
def main(cfg: DictConfig) -> None:
    run_attribution(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
