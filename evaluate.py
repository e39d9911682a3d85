"""Evaluate a model or an attribution: `python evaluate.py benchmark=<name> [overrides]`.

Returns the benchmark summary's headline metric (its "metric" entry; None when it has none)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffusion_attribution.jobs.evaluate import headline_metric, run_benchmark


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    return headline_metric(run_benchmark(cfg, HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
