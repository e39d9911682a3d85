"""`evaluate.py benchmark=ranking_context` (evaluation/ranking_context.py): it reads a world caption's
colour, shape and background in every caption template (the words are disjoint sets, so word order
does not matter), and counts what a ranking's top K holds through evaluate's job."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from compose_jobs import compose_job
from conftest import TINY_WORLD
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from diffusion_attribution.data.shapes import CAPTION_TEMPLATES
from diffusion_attribution.evaluation.ranking_context import caption_attributes
from diffusion_attribution.evaluation.retrieval import concept_index
from diffusion_attribution.jobs.evaluate import run_benchmark


@pytest.fixture(autouse=True)
def clear_hydra():
    yield
    HydraConfig.instance().cfg = None


def test_caption_attributes_in_every_template() -> None:
    for template in CAPTION_TEMPLATES:
        caption = template.format(desc="striped yellow triangle", background="white")
        assert caption_attributes(caption) == {
            "colour": "yellow",
            "shape": "triangle",
            "background": "white",
        }
    assert caption_attributes("a <new1> on a gray background")["shape"] is None


def test_ranking_context_through_evaluate(shapes, shapes_cache: Path, tmp_path: Path) -> None:
    """A hand-made run on the tiny world: query 0 ranks its concept first, query 1 another concept's
    images first; the counts, the table and the headline follow."""
    world = [*(f"data.{k}={v}" for k, v in TINY_WORLD.items()), f"data.cache_dir={shapes_cache}"]
    concepts = concept_index(shapes)
    num_train = shapes.num_examples
    striped, hollow = list(concepts["striped"]), list(concepts["hollow"])
    plain = [i for i in range(num_train) if not shapes.source.metadata(i).get("concept")]
    top = len(striped) + 2
    scores = np.zeros((2, num_train), dtype=np.float32)
    scores[0, striped + plain[:2]] = np.arange(top, 0, -1)  # all of its concept, then two plain
    scores[1, hollow + plain[: top - len(hollow)]] = np.arange(top, 0, -1)  # "a dotted ...": another concept
    run = tmp_path / "run"
    run.mkdir()
    np.save(run / "scores.npy", scores)
    queries = [
        {"caption": "a striped red cross on a white background"},
        {"caption": "a dotted blue circle on a gray background"},
    ]
    (run / "ranking.json").write_text(json.dumps({"method": "hand-made", "queries": queries}))
    data_cfg = compose_job("evaluate", world, tmp_path / "attribute")
    (run / "config.yaml").write_text(
        OmegaConf.to_yaml({"data": OmegaConf.to_container(data_cfg.data, resolve=True)})
    )
    HydraConfig.instance().cfg = None

    out = tmp_path / "eval"
    cfg = compose_job(
        "evaluate", ["benchmark=ranking_context", f"scores=[{run}]", f"benchmark.top={top}", *world], out
    )
    result = run_benchmark(cfg, out)
    with open(out / "ranking_context.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["asked_concept"], r["other_concept"], r["plain"]) for r in rows] == [
        (str(len(striped)), "0", "2"),
        ("0", str(len(hollow)), str(top - len(hollow))),
    ]
    (summary,) = result["runs"]
    assert summary["asked_in_top"] == len(striped) and summary["other_in_top"] == len(hollow)
    assert result["headline"] == {"name": "relevant_share", "value": len(striped) / (2 * top)}
    table = (out / "ranking_context.md").read_text()
    assert f"{run} (top {top})" in table and "| **all queries** |" in table
    assert json.loads((out / "metrics.json").read_text())["top"] == top
