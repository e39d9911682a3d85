"""`evaluate.py benchmark=fidelity_curve run=<train run dir>` (evaluation/fidelity_curve.py): every
periodic checkpoint of a training run is exported and read by the fidelity benchmark, in step order,
with the run's wall-clock minutes from its train.log."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from compose_jobs import compose_job
from conftest import FAST_TRAIN
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from diffusion_attribution.data.shapes import ShapesWorldConfig
from diffusion_attribution.evaluation import fidelity
from diffusion_attribution.evaluation.attribute_reader import train_attribute_reader
from diffusion_attribution.jobs.evaluate import run_benchmark
from diffusion_attribution.jobs.train import run_training


@pytest.fixture(autouse=True)
def clear_hydra():
    yield
    HydraConfig.instance().cfg = None


def test_fidelity_curve_reads_every_checkpoint(shapes_cache: Path, monkeypatch, tmp_path: Path) -> None:
    readers = []

    def fast_reader(world: ShapesWorldConfig, cache_dir):
        if not readers:
            readers.append(train_attribute_reader(world, train_size=300, test_size=100, epochs=1))
        return readers[0]

    monkeypatch.setattr(fidelity, "load_or_train_reader", fast_reader)
    train_dir = tmp_path / "train"
    overrides = [
        *FAST_TRAIN,
        f"data.cache_dir={shapes_cache}",
        "model.resolution=16",
        "samples.every_n_steps=0",
        "training.keep_checkpoints=true",
    ]
    train_cfg = compose_job("train", overrides, train_dir)
    run_training(train_cfg, train_dir)
    HydraConfig.instance().cfg = None
    # What the Hydra app writes beside a run: its config and its log (progress lines).
    (train_dir / ".hydra").mkdir()
    (train_dir / ".hydra" / "config.yaml").write_text(
        OmegaConf.to_yaml(OmegaConf.masked_copy(train_cfg, [k for k in train_cfg if k != "hydra"]))
    )
    (train_dir / "train.log").write_text(
        "step 2/4  loss 1.0000  9.00 steps/s  0.5 min elapsed, 0.5 min left\n"
        "step 4/4  loss 0.9000  9.00 steps/s  1.0 min elapsed, 0.0 min left\n"
    )
    assert sorted(p.name for p in (train_dir / "checkpoints").glob("step_*.ckpt")) == [
        "step_000002.ckpt",
        "step_000004.ckpt",
    ]

    out = tmp_path / "eval"
    cfg = compose_job(
        "evaluate",
        ["benchmark=fidelity_curve", f"run={train_dir}", "benchmark.num_steps=2", "benchmark.seeds_per_prompt=1",
         "benchmark.prompts_per_concept=1"],
        out,
    )  # fmt: skip
    result = run_benchmark(cfg, out)
    with open(out / "fidelity_curve.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["minutes"]) for r in rows] == [("2", "0.5"), ("4", "1.0")]
    for row, step in zip(rows, (2, 4), strict=True):
        per_step = json.loads((out / f"step_{step}" / "metrics.json").read_text())
        assert float(row["rare_concept_hit_rate"]) == pytest.approx(per_step["rare_concept_hit_rate"])
    assert result["headline"]["name"] == "rare_concept_hit_rate"
    assert result["headline"]["value"] == pytest.approx(float(rows[-1]["rare_concept_hit_rate"]))
    assert (out / "fidelity_curve.png").stat().st_size > 0 and "| 4 | 1.0 |" in (
        out / "fidelity_curve.md"
    ).read_text()
