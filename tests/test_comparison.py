"""`evaluate.py benchmark=retrieval scores='[run, run, ...]'`: the method comparison table on three
hand-written attribute run directories (values computed by hand), its chart, the labels that tell
runs of one method apart, and the refusal of runs on different queries or models."""

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

from diffusion_attribution.evaluation.comparison import QueryMismatchError, method_labels
from diffusion_attribution.evaluation.retrieval import RetrievalResult
from diffusion_attribution.jobs.evaluate import run_benchmark

NUM = TINY_WORLD["num_common"] + 8 * TINY_WORLD["images_per_rare_concept"]  # 96
RELEVANT = [[10, 11], [20, 21, 22, 23], [30]]
QUERIES = [
    {"prompt": "q zero", "seed": 0, "relevant_ids": RELEVANT[0]},
    {"prompt": "q one", "seed": 1, "relevant_ids": RELEVANT[1]},
    {"prompt": "q two", "seed": 2, "relevant_ids": RELEVANT[2]},
    {"prompt": "a green square on a gray background", "seed": 3},  # no ground truth: skipped by all
]
PLAIN = [i for i in range(NUM) if i not in {10, 11, 20, 21, 22, 23, 30}]


@pytest.fixture(autouse=True)
def clear_hydra():
    yield
    HydraConfig.instance().cfg = None


def ranked(order: list[int]) -> np.ndarray:
    """Scores whose descending order starts with `order`, then every other id by id."""
    full = list(order) + [i for i in range(NUM) if i not in order]
    scores = np.empty(NUM, dtype=np.float32)
    scores[full] = np.arange(NUM, 0, -1, dtype=np.float32)
    return scores


def write_run(
    folder: Path, method: str, orders: list[list[int]], extra: dict | None = None, **changes
) -> Path:
    folder.mkdir(parents=True)
    scores = np.stack([ranked(order) for order in orders])
    np.save(folder / "scores.npy", scores)
    queries = [
        {"caption": q["prompt"], **q, "saved_image": str(folder / f"q{k}.png")} for k, q in enumerate(QUERIES)
    ]
    for k, change in changes.get("query_changes", {}).items():
        queries[k].update(change)
    ranking = {"method": method, "method_config": {}, "model": "/ckpt", "queries": queries, **(extra or {})}
    (folder / "ranking.json").write_text(json.dumps(ranking))
    return folder


# Hand-computed per-query metrics (P@10, R@10, AP) of the three runs below.
EXPECTED = {
    "unlearning": [(0.2, 1.0, 1.0), (0.4, 1.0, 1.0), (0.1, 1.0, 1.0)],
    "features:pixel": [
        (0.2, 1.0, (1 / 2 + 2 / 4) / 2),  # relevant at ranks 2 and 4
        (0.1, 0.25, (1 / 1 + 2 / 11 + 3 / 12 + 4 / 13) / 4),  # ranks 1, 11, 12, 13
        (0.1, 1.0, 1.0),
    ],
    "random": [  # every id in id order: id i at rank i + 1
        (0.0, 0.0, (1 / 11 + 2 / 12) / 2),
        (0.0, 0.0, (1 / 21 + 2 / 22 + 3 / 23 + 4 / 24) / 4),
        (0.0, 0.0, 1 / 31),
    ],
}


# Per query, the share of its top 10 held by hub images (in >= 2 queries' top 10 while irrelevant).
# Every run fills its ranking with the other ids in id order, so ids 0-8 crowd the three top 10s:
# unlearning's irrelevant tops are 0-7, 0-5, 0-8 (hubs 0-7: 8, 6, 8 slots), pixel's 0-7, 0-8, 0-8
# (hubs 0-8), random's 0-9 three times (all ten are hubs).
HUB_SHARE = {
    "unlearning": [0.8, 0.6, 0.8],
    "features:pixel": [0.8, 0.9, 0.9],
    "random": [1.0, 1.0, 1.0],
}


@pytest.fixture
def three_runs(tmp_path: Path) -> list[Path]:
    unlearning = write_run(
        tmp_path / "unlearning-run",
        "unlearning",
        [RELEVANT[0], RELEVANT[1], RELEVANT[2], []],
        {"timing": {"prepare_s": 100.0, "score_s": 30.0}, "train_side_mb": 12.5},
    )
    pixel = write_run(
        tmp_path / "pixel-run",
        "features:pixel",
        [[0, 10, 1, 11], [20, *PLAIN[:9], 21, 22, 23], [30], []],
        {"timing": {"prepare_s": 2.0, "score_s": 0.4}, "train_side_mb": 0.375},
    )
    random = write_run(tmp_path / "random-run", "random", [[], [], [], []])  # an older run: no timing
    return [unlearning, pixel, random]


def compare(dirs: list[Path], out: Path, shapes_cache: Path) -> dict:
    overrides = [
        "benchmark=retrieval",
        f"scores=[{','.join(str(d) for d in dirs)}]",
        *(f"data.{k}={v}" for k, v in TINY_WORLD.items()),
        f"data.cache_dir={shapes_cache}",
    ]
    return run_benchmark(compose_job("evaluate", overrides, out), out)


def test_comparison_table_matches_hand_computed_values(
    three_runs, shapes_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    summary = compare(three_runs, out, shapes_cache)

    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["unlearning", "features:pixel", "random"]
    assert summary["num_queries"] == 3
    for row in rows:
        per_query = np.array(EXPECTED[row["method"]])
        assert int(row["queries"]) == 3
        for col, key in enumerate(("precision@10", "recall@10", "ap")):
            assert float(row[key]) == pytest.approx(per_query[:, col].mean())
            assert float(row[f"{key}_sem"]) == pytest.approx(per_query[:, col].std(ddof=1) / np.sqrt(3))
    assert float(rows[0]["s_per_query"]) == pytest.approx(30.0 / 4)  # all four queries were scored
    assert float(rows[1]["prepare_s"]) == 2.0 and float(rows[1]["train_side_mb"]) == 0.375
    assert rows[2]["prepare_s"] == rows[2]["s_per_query"] == rows[2]["train_side_mb"] == ""

    table = (out / "comparison.md").read_text().splitlines()
    assert table[0] == (
        "| method | P@10 | R@10 | mAP | hub share of top-10 | prepare s | s / query | train side MB |"
    )
    p10 = np.array(EXPECTED["unlearning"])[:, 0]
    hub = np.array(HUB_SHARE["unlearning"])
    assert table[2] == (
        f"| unlearning | {p10.mean():.3f} ± {p10.std(ddof=1) / np.sqrt(3):.3f} | 1.000 ± 0.000 | "
        f"1.000 ± 0.000 | {hub.mean():.3f} ± {hub.std(ddof=1) / np.sqrt(3):.3f} | 100 | 7.5 | 12.5 |"
    )
    for row in rows:
        assert float(row["hub_share@10"]) == pytest.approx(np.mean(HUB_SHARE[row["method"]]))
    assert table[4].startswith("| random |") and table[4].endswith("| n/a | n/a | n/a |")

    with open(out / "comparison_per_query.csv", newline="") as f:
        per_query = list(csv.DictReader(f))
    assert len(per_query) == 9 and {int(r["query"]) for r in per_query} == {0, 1, 2}
    with Image.open(out / "comparison.png") as image:
        assert image.size[0] > 400 and image.size[1] > 300


def test_one_run_in_a_list_is_the_single_run_benchmark(
    three_runs, shapes_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    summary = compare(three_runs[:1], out, shapes_cache)
    assert summary["method"] == "unlearning" and (out / "retrieval.md").is_file()
    assert not (out / "comparison.md").exists()


def test_runs_on_other_queries_or_models_are_refused(three_runs, shapes_cache: Path, tmp_path: Path) -> None:
    other_seed = write_run(tmp_path / "seed", "dtrak", [[]] * 4, query_changes={2: {"seed": 7}})
    with pytest.raises(QueryMismatchError, match=r"Query 2 differs between \S+ and \S*seed in \['seed'\]"):
        compare([three_runs[0], other_seed], tmp_path / "e1", shapes_cache)
    other_prompt = write_run(
        tmp_path / "prompt", "dtrak", [[]] * 4, query_changes={0: {"prompt": "x", "caption": "x"}}
    )
    with pytest.raises(QueryMismatchError, match=r"Query 0 differs .* \['caption', 'prompt'\]"):
        compare([three_runs[0], other_prompt], tmp_path / "e2", shapes_cache)
    other_model = write_run(tmp_path / "model", "dtrak", [[]] * 4, {"model": "/other"})
    with pytest.raises(QueryMismatchError, match=r"attributed the model /other but \S+ the model /ckpt"):
        compare([three_runs[0], other_model], tmp_path / "e3", shapes_cache)
    real = tmp_path / "checkpoint"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    spelled = [
        write_run(tmp_path / f"spelled{k}", "dtrak", [[]] * 4, {"model": str(m)})
        for k, m in enumerate([real, tmp_path / "link"])
    ]
    assert (
        compare(spelled, tmp_path / "e5", shapes_cache)["num_queries"] == 3
    )  # one checkpoint, two spellings
    fewer = tmp_path / "fewer"
    write_run(fewer, "dtrak", [[]] * 4)
    ranking = json.loads((fewer / "ranking.json").read_text())
    ranking["queries"] = ranking["queries"][:3]
    (fewer / "ranking.json").write_text(json.dumps(ranking))
    np.save(fewer / "scores.npy", np.load(fewer / "scores.npy")[:3])
    with pytest.raises(QueryMismatchError, match=r"has 3 queries but \S+ has 4"):
        compare([three_runs[0], fewer], tmp_path / "e4", shapes_cache)


def test_labels_tell_runs_of_one_method_apart() -> None:
    def result(method: str, config: dict) -> RetrievalResult:
        return RetrievalResult({"method": method, "method_config": config, "queries": []}, [], {}, {})

    results = [
        result("dtrak", {"proj_dim": 2048, "damping": 500, "sweep": {"timesteps": [1, 2]}}),
        result("dtrak", {"proj_dim": 4096, "damping": 500, "sweep": {"timesteps": [1, 3]}}),
        result("random", {"seed": 0}),
        result("unlearning", {"step_size": 0.01}),
        result("unlearning", {"step_size": 0.01}),
    ]
    dirs = ["a/r1", "a/r2", "a/r3", "b/run", "c/run"]
    assert method_labels(results, dirs) == [
        "dtrak (proj_dim=2048, timesteps=[1, 2])",
        "dtrak (proj_dim=4096, timesteps=[1, 3])",
        "random",
        "unlearning [run] #1",
        "unlearning [run] #2",
    ]
