"""evaluate.py benchmark=abc (evaluation/abc.py): Recall@5/10/100 and AP on hand-computed rankings,
the per-concept and per-type averages, and the job end to end on hand-written run directories
(tables, CSVs and the scatter PNG written; bad inputs refused)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from compose_jobs import compose_job
from hydra.core.hydra_config import HydraConfig
from PIL import Image

from diffusion_attribution.evaluation.abc import find_run_dirs, query_rows, summarise
from diffusion_attribution.evaluation.retrieval import retrieval_metrics
from diffusion_attribution.jobs.evaluate import run_benchmark

NUM = 200
EXEMPLARS = [190, 191, 192, 193]  # pool first, exemplars last (as the AbC pools)


@pytest.fixture(autouse=True)
def clear_hydra():
    yield
    HydraConfig.instance().cfg = None


def ranked(order: list[int], num: int = NUM) -> np.ndarray:
    """Scores whose descending order starts with `order`, then every other id by id."""
    full = list(order) + [i for i in range(num) if i not in order]
    scores = np.empty(num, dtype=np.float32)
    scores[full] = np.arange(num, 0, -1, dtype=np.float32) - 150.0  # many negative: ranks still count
    return scores


# Exemplar ranks per query -> hand-computed metrics.
CASES = {
    # ranks 1, 2, 3, 4: perfect
    "perfect": ([190, 191, 192, 193], {"recall@5": 1.0, "recall@10": 1.0, "recall@100": 1.0, "ap": 1.0}),
    # ranks 2, 5, 9, 50: R@5 = 2/4, R@10 = 3/4, AP = (1/2 + 2/5 + 3/9 + 4/50) / 4
    "mixed": (
        [0, 190, 1, 2, 191, 3, 4, 5, 192] + list(range(6, 46)) + [193],
        {"recall@5": 0.5, "recall@10": 0.75, "recall@100": 1.0, "ap": (1 / 2 + 2 / 5 + 3 / 9 + 4 / 50) / 4},
    ),
    # ids 0..189 first: the exemplars at ranks 191..194, none in the top 100
    "worst": (
        list(range(0, 186)),
        {
            "recall@5": 0.0,
            "recall@10": 0.0,
            "recall@100": 0.0,
            "ap": (1 / 191 + 2 / 192 + 3 / 193 + 4 / 194) / 4,
        },
    ),
}


def test_metrics_on_hand_computed_rankings() -> None:
    for name, (order, expected) in CASES.items():
        (row,) = retrieval_metrics(
            ranked(order)[None], [np.array(EXEMPLARS)], precision_at=(), recall_at=(5, 10, 100)
        )
        assert row == pytest.approx(expected), name


def write_run(folder: Path, method: str, queries: list[tuple[str, str, str]]) -> Path:
    """An attribute.py run dir by hand: queries are (case, concept, concept type)."""
    folder.mkdir(parents=True)
    np.save(folder / "scores.npy", np.stack([ranked(CASES[case][0]) for case, _, _ in queries]))
    records = [
        {
            "caption": f"a <new1> thing {k}",
            "relevant_ids": EXEMPLARS,
            "concept": concept,
            "concept_type": kind,
        }
        for k, (_, concept, kind) in enumerate(queries)
    ]
    records.append({"caption": "no ground truth"})  # skipped
    np.save(folder / "scores.npy", np.concatenate([np.load(folder / "scores.npy"), ranked([])[None]]))
    (folder / "ranking.json").write_text(json.dumps({"method": method, "queries": records}))
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    # unlearning: star (object) perfect twice; sepia (style) perfect + mixed; heart (object) mixed
    write_run(root / "unlearning" / "star", "unlearning", [("perfect", "star", "object")] * 2)
    write_run(
        root / "unlearning" / "sepia",
        "unlearning",
        [("perfect", "sepia", "style"), ("mixed", "sepia", "style")],
    )
    write_run(root / "unlearning" / "heart", "unlearning", [("mixed", "heart", "object")])
    write_run(root / "pixel" / "star", "pixel", [("worst", "star", "object")])
    write_run(root / "pixel" / "sepia", "pixel", [("mixed", "sepia", "style")])
    return root


def test_concepts_count_once_in_the_type_average(runs: Path) -> None:
    rows = [r for d in find_run_dirs([str(runs)]) for r in query_rows(d, (5, 10, 100))]
    assert len(rows) == 7  # the queries without relevant_ids are skipped
    concepts, summary = summarise(rows, ["recall@5", "recall@10", "recall@100", "ap"])
    by = {(r["method"], r["concept_type"]): r for r in summary}
    mixed = CASES["mixed"][1]
    # objects: star 1.0 (2 queries), heart = mixed: mean over concepts, not over the 3 queries
    assert by[("unlearning", "object")]["ap"] == pytest.approx((1.0 + mixed["ap"]) / 2)
    assert by[("unlearning", "object")]["num_queries"] == 3
    assert by[("unlearning", "style")]["recall@10"] == pytest.approx((1.0 + 0.75) / 2)
    assert by[("unlearning", "all")]["num_concepts"] == 3
    assert by[("pixel", "object")]["recall@100"] == 0.0
    sepia = next(r for r in concepts if r["method"] == "unlearning" and r["concept"] == "sepia")
    assert sepia["recall@5"] == pytest.approx(0.75) and sepia["num_queries"] == 2


def test_evaluate_job_writes_tables_and_plot(runs: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "eval"
    dirs = sorted(str(p.parent) for p in runs.rglob("ranking.json"))
    cfg = compose_job("evaluate", ["benchmark=abc", f"scores=[{','.join(dirs)}]"], run_dir)
    result = run_benchmark(cfg, run_dir)
    for name in ("abc.md", "abc_queries.csv", "abc_concepts.csv", "abc_summary.csv", "metrics.json"):
        assert (run_dir / name).is_file(), name
    with Image.open(run_dir / "abc.png") as image:
        assert image.size[0] > 300
    table = (run_dir / "abc.md").read_text()
    # objects: star (R@5 1, R@10 1) and heart (0.5, 0.75): mean ± s.e. over the two concepts
    assert (
        "| object (2 concepts, 3 queries) | unlearning | 0.750 ± 0.250 | 0.875 ± 0.125 | 1.000 ± 0.000 |"
        in table
    )
    with open(run_dir / "abc_summary.csv") as handle:
        summary = list(csv.DictReader(handle))
    assert {r["concept_type"] for r in summary} == {"object", "style", "all"}
    assert len(result["runs"]) == 5
    # a parent folder is searched for run directories: same result
    again = compose_job("evaluate", ["benchmark=abc", f"scores={runs}"], tmp_path / "eval2")
    assert run_benchmark(again, tmp_path / "eval2")["summary"] == result["summary"]


def test_variants_of_one_method_get_their_own_rows(tmp_path: Path) -> None:
    """A pruned and a full run of one method (one run per concept each) are two rows, not one."""
    root = tmp_path / "runs"
    for variant, case, candidates in (
        ("full", "perfect", None),
        ("pruned", "mixed", {"ranker": "captions", "k": 0.1}),
    ):
        for concept, kind in (("star", "object"), ("sepia", "style")):
            folder = write_run(root / variant / concept, "unlearning:ekfac", [(case, concept, kind)])
            ranking = json.loads((folder / "ranking.json").read_text())
            ranking["method_config"] = {"step_size": 0.01, "candidates": candidates}
            (folder / "ranking.json").write_text(json.dumps(ranking))
    run_dir = tmp_path / "eval"
    cfg = compose_job("evaluate", ["benchmark=abc", f"scores=[{root}]"], run_dir)
    summary = run_benchmark(cfg, run_dir)["summary"]
    every = {r["method"]: r for r in summary if r["concept_type"] == "all"}
    assert set(every) == {
        "unlearning:ekfac (candidates=None)",
        "unlearning:ekfac (candidates.k=0.1, ranker=captions)",
    }
    assert every["unlearning:ekfac (candidates=None)"]["ap"] == 1.0
    assert every["unlearning:ekfac (candidates=None)"]["num_concepts"] == 2
    assert every["unlearning:ekfac (candidates.k=0.1, ranker=captions)"]["ap"] == pytest.approx(
        CASES["mixed"][1]["ap"]
    )


def test_bad_inputs(tmp_path: Path, runs: Path) -> None:
    with pytest.raises(ValueError, match="scores="):
        find_run_dirs(None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no ranking.json"):
        find_run_dirs([str(tmp_path / "empty")])
    (runs / "pixel" / "star" / "scores.npy").unlink()
    with pytest.raises(FileNotFoundError, match="without scores.npy"):
        find_run_dirs([str(runs)])
