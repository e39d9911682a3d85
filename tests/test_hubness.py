"""Hub images (evaluation/hubness.py) on synthetic scores: a planted hub in every query's top 10 is
found with the right count and share, relevance to a query keeps an image from counting for it, the
threshold as a count or a fraction, and the reports of benchmark=retrieval (one run and the
comparison table's column)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from compose_jobs import compose_job
from conftest import TINY_WORLD
from hydra.core.hydra_config import HydraConfig
from PIL import Image

from diffusion_attribution.evaluation import hubness
from diffusion_attribution.evaluation.comparison import markdown_table
from diffusion_attribution.jobs.evaluate import run_benchmark

NUM = TINY_WORLD["num_common"] + 8 * TINY_WORLD["images_per_rare_concept"]  # 96


@pytest.fixture(autouse=True)
def clear_hydra():
    yield
    HydraConfig.instance().cfg = None


def scores_with_tops(tops: list[list[int]], num: int) -> np.ndarray:
    """[Q, num] scores whose descending order of query q starts with tops[q]; every other id scores
    lower, in an order that differs per query (so the rest of a top 10 is not shared by accident)."""
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, size=(len(tops), num))
    for q, top in enumerate(tops):
        scores[q, top] = 10.0 + np.arange(len(top), 0, -1)
    return scores


# Five queries, each with its own relevant ids; id 7 is planted first in every query's ranking and is
# relevant to query 2 only. Each top 10 is the hub, then the query's relevant ids, then ids of its own.
RELEVANT = [[20, 21], [30, 31, 32], [7, 40], [50], [60, 61, 62, 63]]
OWN = [list(range(100 + 10 * q, 110 + 10 * q)) for q in range(5)]  # never shared between queries
TOPS = [list(dict.fromkeys([7, *RELEVANT[q], *OWN[q]]))[:10] for q in range(5)]


def test_planted_hub_is_found_with_its_count_and_exact_share() -> None:
    result = hubness.hubness(scores_with_tops(TOPS, 200), RELEVANT, top_k=10, min_queries=2)

    assert result.min_queries == 2 and result.num_queries == 5
    assert result.hubs.tolist() == [7]  # every other image is in a single query's top 10
    assert result.counts[7] == 4  # in all five top 10s, relevant to query 2: counts in four
    assert result.queries_of[7] == [0, 1, 3, 4]
    assert result.slots.tolist() == [10] * 5
    assert result.hub_slots.tolist() == [1, 1, 0, 1, 1]
    assert result.hub_share == pytest.approx(4 / 50)
    assert result.hub_share_sem == pytest.approx(np.std([0.1, 0.1, 0.0, 0.1, 0.1], ddof=1) / np.sqrt(5))
    irrelevant = [10 - len(RELEVANT[q]) for q in range(5)]
    irrelevant[2] = 10 - 2  # the hub is one of query 2's relevant ids
    assert result.irrelevant_slots.tolist() == irrelevant
    assert result.irrelevant_share == pytest.approx(sum(irrelevant) / 50)
    assert result.histogram() == {1: sum(irrelevant) - 4, 4: 1}

    (hub,) = result.top_hubs(file_name=lambda i: f"img{i}.png", metadata=lambda i: {"concept": "striped"})
    assert hub == {
        "id": 7,
        "file": "img7.png",
        "count": 4,
        "queries": [0, 1, 3, 4],
        "concept": "striped",
        "metadata": {"concept": "striped"},
    }
    summary = result.summary()
    assert summary["num_hubs"] == 1 and summary["hub_slots"] == 4 and summary["slots"] == 50
    json.dumps(summary)  # JSON-ready for metrics.json


def test_an_image_relevant_to_a_query_does_not_count_for_it() -> None:
    # id 5 is in both top 10s but relevant to query 1: counts once, so it is no hub at 2 queries.
    tops = [[5, 1, 2], [5, 3, 4]]
    result = hubness.hubness(scores_with_tops(tops, 50), [[1], [5]], top_k=3, min_queries=2)
    assert result.counts[5] == 1 and result.queries_of[5] == [0]
    assert len(result.hubs) == 0 and result.hub_share == 0.0
    # relevant to neither: a hub in both queries' top 3
    result = hubness.hubness(scores_with_tops(tops, 50), [[1], [3]], top_k=3, min_queries=2)
    assert result.hubs.tolist() == [5] and result.hub_share == pytest.approx(2 / 6)


def test_threshold_as_a_count_or_a_fraction_and_top_k() -> None:
    scores = scores_with_tops(TOPS, 200)
    assert hubness.hubness(scores, RELEVANT, min_queries=0.5).min_queries == 3  # ceil(0.5 * 5)
    assert hubness.hubness(scores, RELEVANT, min_queries=0.8).min_queries == 4
    assert hubness.hubness(scores, RELEVANT, min_queries=5).hubs.tolist() == []  # 4 < 5
    assert hubness.hubness(scores, RELEVANT, min_queries=4).hubs.tolist() == [7]
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="hub_min_queries"):
            hubness.hubness(scores, RELEVANT, min_queries=bad)
    one = hubness.hubness(scores, RELEVANT, top_k=1)  # only the hub is in each top 1
    assert one.hub_share == pytest.approx(4 / 5) and one.counts.sum() == 4


def test_unscored_ids_are_never_in_a_top_k() -> None:
    scores = np.full((2, 20), np.nan)
    scores[:, :3] = [[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]
    result = hubness.hubness(scores, [[], []], top_k=10)
    assert result.slots.tolist() == [3, 3]
    assert result.hubs.tolist() == [0, 1, 2] and result.hub_share == 1.0


def test_ties_are_broken_by_the_lower_id() -> None:
    (top,) = hubness.top_k_ids(np.array([[1.0, 5.0, 5.0, 0.0, 5.0]]), 2)
    assert top.tolist() == [1, 2]


def test_comparison_markdown_has_the_hub_column() -> None:
    row = {
        "method": "m",
        **{k: 0.5 for k in ("precision@10", "recall@10", "ap")},
        **{f"{k}_sem": 0.1 for k in ("precision@10", "recall@10", "ap")},
        "hub_share@10": 0.25,
        "hub_share@10_sem": 0.05,
        "prepare_s": None,
        "s_per_query": None,
        "train_side_mb": None,
    }
    lines = markdown_table([row], hub_top_k=10).splitlines()
    assert (
        lines[0]
        == "| method | P@10 | R@10 | mAP | hub share of top-10 | prepare s | s / query | train side MB |"
    )
    assert (
        lines[2] == "| m | 0.500 ± 0.100 | 0.500 ± 0.100 | 0.500 ± 0.100 | 0.250 ± 0.050 | n/a | n/a | n/a |"
    )


# ------------------------------------------------------------------------------ benchmark=retrieval
def write_run(folder: Path, method: str, scores: np.ndarray, queries: list[dict]) -> Path:
    folder.mkdir(parents=True)
    np.save(folder / "scores.npy", scores.astype(np.float32))
    ranking = {"method": method, "method_config": {}, "model": "/ckpt", "queries": queries}
    (folder / "ranking.json").write_text(json.dumps(ranking))
    return folder


def evaluate(scores: str, out: Path, shapes_cache: Path, *extra: str) -> dict:
    overrides = [
        "benchmark=retrieval",
        f"scores={scores}",
        *(f"data.{k}={v}" for k, v in TINY_WORLD.items()),
        f"data.cache_dir={shapes_cache}",
        *extra,
    ]
    return run_benchmark(compose_job("evaluate", overrides, out), out)


def test_benchmark_reports_the_hubs_of_one_run_and_of_a_comparison(
    shapes, shapes_cache: Path, tmp_path: Path
) -> None:
    rare = [i for i in range(NUM) if shapes.source.metadata(i).get("concept")]
    hub = rare[0]
    concept = shapes.source.metadata(hub)["concept"]
    plain = [i for i in range(NUM) if i not in rare]
    relevant = [plain[4 * q : 4 * q + 2] for q in range(4)]  # never the hub
    tops = [[hub, *relevant[q], *plain[20 + 7 * q : 27 + 7 * q]] for q in range(4)]  # 10 each
    queries = [{"caption": f"q {q}", "relevant_ids": relevant[q]} for q in range(4)]
    planted = write_run(tmp_path / "planted", "unlearning", scores_with_tops(tops, NUM), queries)

    out = tmp_path / "one"
    summary = evaluate(str(planted), out, shapes_cache, "benchmark.hub_list_size=5")
    hubs = summary["hubness"]
    assert hubs["top_k"] == 10 and hubs["min_queries"] == 2 and hubs["num_hubs"] == 1
    assert hubs["hub_share"] == pytest.approx(4 / 40)
    (listed,) = hubs["top_hubs"]
    assert listed["id"] == hub and listed["count"] == 4 and listed["concept"] == concept
    assert listed["file"] == shapes.source.file_name(hub)
    assert json.loads((out / "metrics.json").read_text())["hubness"]["hub_share"] == pytest.approx(0.1)
    text = (out / "hubness.md").read_text()
    assert "hub share of top-10: 0.100 ± 0.000 (4 of 40 slots)" in text
    assert f"| {hub} | {listed['file']} | 4 / 4 | {concept} | 0, 1, 2, 3 |" in text
    with open(out / "hubness.csv", newline="") as f:
        assert [(int(r["id"]), int(r["count"])) for r in csv.DictReader(f)] == [(hub, 4)]
    assert (out / "hubness_histogram.png").is_file()
    assert (out / "retrieval.md").read_text().count("\n") == 2 + 4 + 1  # the metrics table unchanged

    clean_tops = [[*relevant[q], *plain[20 + 8 * q : 28 + 8 * q]] for q in range(4)]
    clean = write_run(tmp_path / "clean", "dtrak", scores_with_tops(clean_tops, NUM), queries)
    out = tmp_path / "both"
    summary = evaluate(f"[{planted},{clean}]", out, shapes_cache, "benchmark.hub_top_k=5")
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # top 5: the hub, two relevant ids, two own ids: the hub holds 1 of 5 slots; none in the clean run
    assert [float(r["hub_share@5"]) for r in rows] == pytest.approx([0.2, 0.0])
    assert [int(r["hub_images@5"]) for r in rows] == [1, 0]
    table = (out / "comparison.md").read_text().splitlines()
    assert "| hub share of top-5 |" in table[0]
    assert table[2].startswith("| unlearning | ") and "| 0.200 ± 0.000 |" in table[2]
    assert summary["hubness"]["unlearning"]["top_hubs"][0]["id"] == hub
    for name in ("hubness.png", "hubness_histogram.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 300
