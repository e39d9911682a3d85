"""The linear datamodeling score (evaluation/lds.py): it recovers known linear structure, it is
chance for unrelated scores and negative for reversed ones, its subsets are keyed and half the data,
and one set of subset retrains serves every method."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from compose_jobs import compose_job
from conftest import FAST_TRAIN
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from diffusion_attribution.evaluation.lds import LDSError, linear_datamodeling_scores, subset_masks
from diffusion_attribution.jobs.evaluate import run_benchmark
from diffusion_attribution.models.pipeline import CONFIG_FILE


def linear_world(num_queries: int = 6, num_examples: int = 300, num_subsets: int = 60, noise: float = 0.05):
    """True influences w [Q, N]; a subset model's query loss is c_q − Σ_{i ∈ S} w_qi + noise."""
    rng = np.random.default_rng(0)
    influence = rng.normal(size=(num_queries, num_examples))
    masks = subset_masks(num_examples, num_subsets, 0.5, seed=0)
    signal = masks.astype(np.float64) @ influence.T  # [M, Q]
    losses = 5.0 - signal + noise * signal.std() * rng.normal(size=signal.shape)
    return influence, masks, losses


def test_lds_recovers_linear_structure() -> None:
    influence, masks, losses = linear_world()
    rng = np.random.default_rng(1)
    exact = linear_datamodeling_scores(influence, masks, losses)
    noisy = linear_datamodeling_scores(influence + rng.normal(size=influence.shape), masks, losses)
    unrelated = linear_datamodeling_scores(rng.normal(size=influence.shape), masks, losses)
    reversed_ = linear_datamodeling_scores(-influence, masks, losses)
    assert exact.shape == (6,)
    assert exact.min() > 0.95
    assert 0.3 < noisy.mean() < exact.mean()  # a noisy estimate of the influences: lower but positive
    assert abs(unrelated.mean()) < 0.2
    assert reversed_.max() < -0.95


def test_subsets_are_keyed_halves() -> None:
    masks = subset_masks(101, 8, 0.5, seed=3)
    assert masks.shape == (8, 101) and (masks.sum(1) == 50).all()  # round(0.5 * 101) = 50
    assert np.array_equal(masks, subset_masks(101, 8, 0.5, seed=3))
    assert not np.array_equal(masks, subset_masks(101, 8, 0.5, seed=4))
    assert len({m.tobytes() for m in masks}) == 8
    with pytest.raises(LDSError, match="subset_fraction"):
        subset_masks(10, 4, 1.0, seed=0)
    with pytest.raises(LDSError, match="shapes do not match|Shapes do not match"):
        linear_datamodeling_scores(np.zeros((2, 10)), masks, np.zeros((8, 2)))


def test_lds_plans_one_retrain_per_subset_for_all_methods(shapes_cache: Path, tmp_path: Path) -> None:
    base = tmp_path / "base" / "checkpoint"
    base.mkdir(parents=True)
    recipe = compose_job("train", [*FAST_TRAIN, f"data.cache_dir={shapes_cache}"], tmp_path / "base")
    (base / CONFIG_FILE).write_text(OmegaConf.to_yaml(recipe, resolve=True))
    HydraConfig.instance().cfg = None
    runs = []
    for method in ("a", "b"):
        folder = tmp_path / method
        folder.mkdir()
        np.save(folder / "scores.npy", np.random.default_rng(0).random((3, 96), dtype=np.float32))
        queries = [{"caption": f"q{k}", "prompt": f"q{k}", "seed": k} for k in range(3)]
        (folder / "ranking.json").write_text(
            json.dumps({"method": method, "model": str(base), "queries": queries})
        )
        runs.append(folder)
    out = tmp_path / "eval"
    cfg = compose_job(
        "evaluate",
        [
            "benchmark=lds",
            f"scores=[{runs[0]},{runs[1]}]",
            "benchmark.num_subsets=5",
            "benchmark.retrain.dry_run=true",
            "benchmark.retrain.seconds_per_step=0.1",
        ],
        out,
    )
    try:
        summary = run_benchmark(cfg, out)
    finally:
        HydraConfig.instance().cfg = None
    assert summary["jobs"] == 5 and summary["requests"] == 5  # shared by methods a and b
    assert summary["estimated_hours"] == pytest.approx(5 * 4 * 0.1 / 3600)
    assert "k48-" in (out / "plan.md").read_text()  # each subset model trains without half of 96


def test_lds_end_to_end_on_subset_retrains(shapes_cache: Path, tmp_path: Path) -> None:
    """Two methods over 3 subset retrains of a 4-step keyed recipe: one LDS per method and query,
    the subset losses are the retrained models' fixed-noise losses."""
    from diffusion_attribution.attribution.queries import build_queries
    from diffusion_attribution.jobs.train import run_training
    from diffusion_attribution.models.pipeline import TextToImageModel

    recipe = [
        *FAST_TRAIN,
        f"data.cache_dir={shapes_cache}",
        "model.resolution=16",
        "samples.every_n_steps=0",
        "+training.example_keyed_rng=true",
    ]
    try:
        base = run_training(compose_job("train", recipe, tmp_path / "base"), tmp_path / "base")
    finally:
        HydraConfig.instance().cfg = None
    model = TextToImageModel.from_pretrained(base).eval()
    sampler = {"num_steps": 3, "guidance_scale": 3.0, "sampler": "ddim"}
    prompts = {
        "prompts": ["a dotted red circle on a black background", "a split blue cross on a gray background"]
    }
    runs = []
    for method, sign in (("a", 1.0), ("b", -1.0)):
        folder = tmp_path / method
        queries = build_queries(OmegaConf.create({**prompts, "seeds": [0, 1]}), model, folder, **sampler)
        scores = sign * np.arange(2 * 96, dtype=np.float32).reshape(2, 96)
        np.save(folder / "scores.npy", scores)
        ranking = {"method": method, "model": str(base), "queries": [q.record() for q in queries]}
        (folder / "ranking.json").write_text(json.dumps(ranking))
        runs.append(folder)
    out = tmp_path / "eval"
    overrides = [
        "benchmark=lds",
        f"scores=[{runs[0]},{runs[1]}]",
        "benchmark.num_subsets=3",
        f"benchmark.retrain.dir={tmp_path / 'retrains'}",
        "benchmark.retrain.timestep_stride=100",
    ]
    try:
        result = run_benchmark(compose_job("evaluate", overrides, out), out)
    finally:
        HydraConfig.instance().cfg = None
    # Opposite scores give opposite correlations over the same measured losses.
    a, b = result["lds"]["a"]["mean"], result["lds"]["b"]["mean"]
    assert a == pytest.approx(-b) and result["lds"]["a"]["n"] == 2
    losses = (out / "subset_losses.csv").read_text().splitlines()
    assert len(losses) == 1 + 3 and losses[1].startswith("0,k48-")
    assert len(list((tmp_path / "retrains").glob("*/*/retrain.json"))) == 3
    assert (out / "lds.png").stat().st_size > 0 and "| a |" in (out / "lds.md").read_text()
