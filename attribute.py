"""Attribute generated (or given) images to training data:
`python attribute.py model.path=<checkpoint> query.prompts='[...]' query.seeds='[...]' [method=...]`.

Returns the run's retrieval mAP when the queries carry ground truth (query.relevant_ids or
query.concepts), else None: `-m` sweeps (hydra/sweeper=optuna) optimise it."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffusion_attribution.jobs.attribute import attribute


@hydra.main(version_base="1.3", config_path="conf", config_name="attribute")
def main(cfg: DictConfig) -> float | None:
    return attribute(cfg, HydraConfig.get().runtime.output_dir).metric


if __name__ == "__main__":
    main()
