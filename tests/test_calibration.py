"""Calibration through Hydra: experiment=calibrate_rare (tuning queries with ground truth, a subset of
ids) composed with the optuna sweeper config (no real sweep), and the score-subset helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from compose_jobs import compose_job
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_attribution.attribution.base import mask_unscored
from diffusion_attribution.data.shapes import ShapesWorldConfig, generate_world
from diffusion_attribution.jobs.attribute import chosen_ids


@pytest.fixture(autouse=True)
def clear_hydra():
    yield
    HydraConfig.instance().cfg = None


def compose_attribute(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("attribute", overrides=overrides, return_hydra_config=True)


def test_the_optuna_sweeper_composes_with_the_calibration_experiment(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_attribute(
        [
            "experiment=calibrate_rare",
            "model.path=ckpt",
            "method=unlearning_ekfac",
            "hydra/sweeper=optuna_search",
        ]
    )
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize" and 1 <= sweeper.n_trials <= 20
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert instantiate(sweeper).__class__.__name__ == "OptunaSweeper"  # the plugin accepts the settings
    # The search space given on the command line (as in the experiment's comment) is one the plugin reads.
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    (override,) = OverridesParser.create().parse_overrides(["method.step_size=tag(log,interval(1e-4,1e-1))"])
    distribution = create_optuna_distribution_from_override(override)
    assert (distribution.low, distribution.high) == (1e-4, 1e-1) and "Log" in type(distribution).__name__
    assert cfg.method.curvature._target_.endswith("EKFACCurvature")


def test_a_grid_composes_per_point(tmp_path: Path) -> None:
    for step in ("1e-3", "3e-3", "1e-2"):
        cfg = compose_job(
            "attribute",
            [
                "experiment=calibrate_rare",
                "model.path=ckpt",
                "method=unlearning_ekfac",
                f"method.step_size={step}",
            ],
            tmp_path / step,
        )
        assert cfg.method.step_size == float(step)
        HydraConfig.instance().cfg = None


def test_calibration_queries_are_tuning_queries_with_ground_truth(tmp_path: Path) -> None:
    cfg = compose_job("attribute", ["experiment=calibrate_rare", "model.path=ckpt"], tmp_path)
    world = ShapesWorldConfig(**{k: v for k, v in cfg.data.items() if k in ("seed", "num_common")})
    concepts = list(cfg.data.rare_concepts)
    # one prompt per rare concept, naming it, labelled with it
    assert list(cfg.query.concepts) == concepts
    assert [p.split()[1] for p in cfg.query.prompts] == concepts
    # sampling seeds from 100: never the evaluation queries' seeds (from 0)
    assert sorted(cfg.query.seeds) == list(range(100, 100 + len(concepts)))
    # score_ids: every rare-concept image of the default world plus 200 plain ones
    _, records = generate_world(
        ShapesWorldConfig(
            seed=int(cfg.data.seed),
            num_common=int(cfg.data.num_common),
            images_per_rare_concept=int(cfg.data.images_per_rare_concept),
            rare_concepts=tuple(concepts),
            resolution=8,
            concept_colours=cfg.data.concept_colours,
        )
    )
    ids = chosen_ids(cfg, len(records))
    rare = {i for i, r in enumerate(records) if r.get("concept")}
    assert rare <= set(ids.tolist()) and len(ids) == len(rare) + 200
    assert world.num_common == 1000


def test_unscored_columns_rank_below_every_scored_one() -> None:
    scores = np.array([[0.5, -3e9, 2.0, 7.0], [1.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    masked = mask_unscored(scores, np.array([1, 2]))
    assert np.isfinite(masked).all()
    assert np.array_equal(masked[:, [1, 2]], scores[:, [1, 2]])
    for row in masked:
        assert row[[0, 3]].max() < row[[1, 2]].min() and row[0] == row[3]
    assert masked[1, 0] == 0.0  # lowest scored 1.0, minus max(1, |1.0|)
    assert mask_unscored(scores, None) is scores


def test_score_ids_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "ids.json"
    path.write_text(json.dumps([5, 3, 5]))
    assert chosen_ids(OmegaConf.create({"score_ids": str(path)}), 10).tolist() == [3, 5]
    assert chosen_ids(OmegaConf.create({"score_ids": [9, 0]}), 10).tolist() == [0, 9]
    assert chosen_ids(OmegaConf.create({"score_ids": None}), 10) is None
    with pytest.raises(Exception, match="score_ids"):
        chosen_ids(OmegaConf.create({"score_ids": [10]}), 10)
    with pytest.raises(ValueError, match="score_ids is empty"):
        chosen_ids(OmegaConf.create({"score_ids": []}), 10)
