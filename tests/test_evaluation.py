"""evaluate.py's benchmarks: retrieval metrics against hand-computed values, the retrieval benchmark
end to end on a hand-written attribute run directory, the fidelity summary and prompts, the fidelity
benchmark's plumbing with a fast reader, and the attribute reader's accuracy on held-out images."""

from __future__ import annotations

import csv
import json
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from compose_jobs import compose_job
from conftest import TINY_WORLD
from hydra.core.hydra_config import HydraConfig

from diffusion_attribution.data.shapes import ShapesWorldConfig
from diffusion_attribution.evaluation import fidelity
from diffusion_attribution.evaluation.attribute_reader import NONE_CONCEPT, train_attribute_reader
from diffusion_attribution.evaluation.fidelity import fidelity_prompts, summarise
from diffusion_attribution.evaluation.retrieval import concept_index, retrieval_metrics
from diffusion_attribution.jobs.evaluate import run_benchmark

NUM_TRAIN = TINY_WORLD["num_common"] + 8 * TINY_WORLD["images_per_rare_concept"]


@pytest.fixture(autouse=True)
def clear_hydra():
    yield
    HydraConfig.instance().cfg = None


def world_overrides(shapes_cache: Path) -> list[str]:
    return [*(f"data.{k}={v}" for k, v in TINY_WORLD.items()), f"data.cache_dir={shapes_cache}"]


def ranked(order: list[int], num: int) -> np.ndarray:
    """Scores whose descending order starts with `order`, then every other id by id."""
    full = list(order) + [i for i in range(num) if i not in order]
    scores = np.empty(num, dtype=np.float32)
    scores[full] = np.arange(num, 0, -1, dtype=np.float32)
    return scores


# --------------------------------------------------------------------------------- retrieval metrics
def test_perfect_ranking() -> None:
    relevant = np.array([3, 7, 11, 20])
    scores = ranked([20, 3, 11, 7], 30)
    (row,) = retrieval_metrics(scores[None], [relevant])
    assert row == pytest.approx({"precision@10": 0.4, "recall@10": 1.0, "recall@100": 1.0, "ap": 1.0})
    many = np.arange(12)
    (row,) = retrieval_metrics(ranked(list(many), 30)[None], [many])
    assert row == pytest.approx({"precision@10": 1.0, "recall@10": 10 / 12, "recall@100": 1.0, "ap": 1.0})


def test_a_known_ranking() -> None:
    """Relevant ids at ranks 1, 3, 6 and 12 (of 120): AP = (1/1 + 2/3 + 3/6 + 4/12) / 4 = 0.625."""
    order = [50, 0, 51, 1, 2, 52, 3, 4, 5, 6, 7, 53]
    relevant = np.array([50, 51, 52, 53])
    worst = ranked([], 120)  # ids 0..119 in order: relevant ids 50..53 at ranks 51..54
    rows = retrieval_metrics(np.stack([ranked(order, 120), worst]), [relevant, relevant])
    assert rows[0] == pytest.approx({"precision@10": 0.3, "recall@10": 0.75, "recall@100": 1.0, "ap": 0.625})
    assert rows[1]["ap"] == pytest.approx((1 / 51 + 2 / 52 + 3 / 53 + 4 / 54) / 4)
    assert rows[1]["precision@10"] == rows[1]["recall@10"] == 0.0
    assert rows[1]["recall@100"] == 1.0


def test_unscored_ids_rank_last() -> None:
    scores = np.linspace(1.0, 0.0, 20, dtype=np.float32)
    scores[0] = np.nan  # id 0 would rank first; a NaN (excluded, unscored) ranks last instead
    (row,) = retrieval_metrics(scores[None], [np.array([0])])
    assert row["ap"] == pytest.approx(1 / 20)
    assert row["recall@10"] == 0.0


# --------------------------------------------------------------------------------- retrieval benchmark
@pytest.fixture
def fake_attribution(shapes, tmp_path: Path) -> tuple[Path, dict[int, dict[str, float]]]:
    """An attribute.py run dir written by hand on the tiny world, and each query's expected metrics."""
    concepts = concept_index(shapes)
    assert sorted(concepts) == sorted(shapes.world.rare_concepts)
    assert all(len(ids) == TINY_WORLD["images_per_rare_concept"] for ids in concepts.values())
    striped, hollow, dotted = (list(concepts[c]) for c in ("striped", "hollow", "dotted"))
    plain = [i for i in range(NUM_TRAIN) if not shapes.source.metadata(i).get("concept")]
    queries = [
        ({"caption": "a striped red cross on a white background"}, ranked(striped, NUM_TRAIN)),
        (
            {"prompt": "a hollow blue circle on a gray background", "seed": 3},
            ranked(
                [hollow[0], plain[0], hollow[1], *plain[1:3], hollow[2], *plain[3:8], hollow[3]], NUM_TRAIN
            ),
        ),
        ({"caption": "a green square on a gray background"}, ranked([], NUM_TRAIN)),  # no ground truth
        (
            {"caption": "a red circle on a black background", "relevant_ids": [5, 9]},
            ranked([9, 0, 1, 5], NUM_TRAIN),
        ),
        ({"caption": "a blue cross on a gray background", "concept": "dotted"}, -ranked(dotted, NUM_TRAIN)),
    ]
    expected = {
        0: {"precision@10": 0.4, "recall@10": 1.0, "recall@100": 1.0, "ap": 1.0},
        1: {"precision@10": 0.3, "recall@10": 0.75, "recall@100": 1.0, "ap": 0.625},
        3: {"precision@10": 0.2, "recall@10": 1.0, "recall@100": 1.0, "ap": 0.75},
        4: {"precision@10": 0.0, "recall@10": 0.0, "recall@100": 0.0, "ap": 0.0},
    }
    n = NUM_TRAIN  # dotted ids at the last four ranks
    expected[4]["ap"] = (1 / (n - 3) + 2 / (n - 2) + 3 / (n - 1) + 4 / n) / 4
    expected[4]["recall@100"] = 1.0 if n <= 100 else 0.0
    run = tmp_path / "attribution"
    run.mkdir()
    np.save(run / "scores.npy", np.stack([s for _, s in queries]).astype(np.float32))
    ranking = {
        "method": "hand-made",
        "method_config": {},
        "queries": [
            {**q, "top_k": [{"id": int(i), "score": float(s[i]), "file": "x"} for i in np.argsort(-s)[:3]]}
            for q, s in queries
        ],
    }
    (run / "ranking.json").write_text(json.dumps(ranking))
    return run, expected


def test_retrieval_benchmark_end_to_end(fake_attribution, shapes_cache: Path, tmp_path: Path) -> None:
    scores_dir, expected = fake_attribution
    out = tmp_path / "eval"
    cfg = compose_job(
        "evaluate", ["benchmark=retrieval", f"scores={scores_dir}", *world_overrides(shapes_cache)], out
    )
    summary = run_benchmark(cfg, out)

    assert summary["method"] == "hand-made" and summary["num_queries"] == 4
    with open(out / "retrieval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["query"]) for r in rows] == [0, 1, 3, 4]  # query 2 names no concept: skipped
    for row in rows:
        want = expected[int(row["query"])]
        assert {k: float(row[k]) for k in want} == pytest.approx(want)
    assert [int(r["num_relevant"]) for r in rows] == [4, 4, 2, 4]
    names = ["precision@10", "recall@10", "recall@100", "ap"]
    mean = {k: np.mean([expected[q][k] for q in expected]) for k in names}
    assert summary["mean"] == pytest.approx(mean)
    assert json.loads((out / "metrics.json").read_text())["mean"] == pytest.approx(mean)
    sem = np.std([expected[q]["ap"] for q in expected], ddof=1) / 2
    assert summary["sem"]["ap"] == pytest.approx(sem)
    table = (out / "retrieval.md").read_text().splitlines()
    assert table[0] == "| query | caption | precision@10 | recall@10 | recall@100 | ap |"
    assert len(table) == 2 + 4 + 1
    assert table[-1].startswith("| **mean ± s.e.** | | ") and f"{mean['ap']:.3f} ± {sem:.3f}" in table[-1]
    assert (out / "config.yaml").is_file()


def test_retrieval_benchmark_refuses_bad_input(fake_attribution, shapes_cache: Path, tmp_path: Path) -> None:
    scores_dir, _ = fake_attribution
    data = world_overrides(shapes_cache)

    def evaluate(scores: Path | None, *extra: str) -> dict:
        out = tmp_path / "eval"
        given = [] if scores is None else [f"scores={scores}"]
        return run_benchmark(
            compose_job("evaluate", ["benchmark=retrieval", *given, *data, *extra], out), out
        )

    with pytest.raises(ValueError, match=r"benchmark=retrieval needs scores="):
        evaluate(None)
    with pytest.raises(FileNotFoundError, match=r"scores.npy not found"):
        evaluate(tmp_path / "nowhere")
    scores = np.load(scores_dir / "scores.npy")
    np.save(scores_dir / "scores.npy", scores[:, :-1])  # one example short
    with pytest.raises(ValueError, match=r"scores.npy has shape \(5, 95\) but there are 5 queries .* 96"):
        evaluate(scores_dir)
    with pytest.raises(ValueError, match=r"has shape"):  # another world than the one attributed
        evaluate(scores_dir, "data.num_common=60")
    np.save(scores_dir / "scores.npy", scores)
    (scores_dir / "ranking.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"ranking.json not found"):
        evaluate(scores_dir)


# --------------------------------------------------------------------------------- fidelity
def fidelity_row(concept: str, read_concept: str, ok: tuple[bool, bool, bool], concept_ok: bool) -> dict:
    row = {"concept": concept, "read_concept": read_concept, "concept_ok": concept_ok}
    row.update({f"{name}_ok": value for name, value in zip(fidelity.ATTRIBUTES, ok, strict=True)})
    return row


def test_summarise_hand_made_rows() -> None:
    rows = [
        fidelity_row(NONE_CONCEPT, NONE_CONCEPT, (True, True, True), True),
        fidelity_row(NONE_CONCEPT, "striped", (False, True, True), False),  # a concept nobody asked for
        fidelity_row("striped", "striped", (True, True, True), True),
        fidelity_row("striped", NONE_CONCEPT, (True, False, True), False),
        fidelity_row("hollow", NONE_CONCEPT, (True, True, True), False),
    ]
    summary = summarise(rows, ["striped", "hollow", "dotted"])
    assert summary.pop("per_concept_hit_rate") == pytest.approx(
        {"striped": 0.5, "hollow": 0.0, "dotted": 0.0}
    )
    assert summary == pytest.approx(
        {
            "num_images": 5,
            "colour_accuracy": 0.8,
            "shape_accuracy": 0.8,
            "background_accuracy": 1.0,
            "attribute_accuracy": (0.8 + 0.8 + 1.0) / 3,
            "all_attributes_accuracy": 0.6,
            "rare_concept_hit_rate": 1 / 3,
            "unasked_concept_rate": 0.5,
            "concepts_recognised": 1,
            "num_concepts": 3,
        }
    )


def test_fidelity_prompts_cover_every_combination_and_concept(shapes) -> None:
    world = shapes.world
    prompts = fidelity_prompts(shapes, seeds_per_prompt=2, prompts_per_concept=3)
    plain = [p for p in prompts if p.concept == NONE_CONCEPT]
    combos = sorted((p.colour, p.shape, p.background) for p in plain)
    assert combos == sorted(2 * list(product(world.colours, world.shapes, world.backgrounds)))
    shown: dict[str, set] = {c: set() for c in world.rare_concepts}
    for idx in range(len(shapes.source)):
        meta = shapes.source.metadata(idx)
        if meta.get("concept"):
            shown[meta["concept"]].add((meta["colour"], meta["shape"], meta["background"]))
    for concept in world.rare_concepts:
        mine = [p for p in prompts if p.concept == concept]
        asked = {(p.colour, p.shape, p.background) for p in mine}
        assert mine and len(asked) == min(3, len(shown[concept])) and asked <= shown[concept]
        assert all(p.prompt.split()[1] == concept for p in mine), [p.prompt for p in mine]
    for p in prompts:
        assert p.colour in p.prompt and p.shape in p.prompt and p.background in p.prompt
    # Each prompt text comes with distinct seeds; no (prompt, seed) pair repeats.
    assert len({(p.prompt, p.seed) for p in prompts}) == len(prompts)


def test_fidelity_benchmark_plumbing(tiny_model, shapes_cache: Path, monkeypatch, tmp_path: Path) -> None:
    checkpoint = tiny_model.save_pretrained(tmp_path / "model")
    trained = []

    def fast_reader(world: ShapesWorldConfig, cache_dir):
        trained.append(cache_dir)
        return train_attribute_reader(world, train_size=300, test_size=100, epochs=1)

    monkeypatch.setattr(fidelity, "load_or_train_reader", fast_reader)
    out = tmp_path / "eval"
    overrides = [
        "benchmark=fidelity",
        f"model.path={checkpoint}",
        "benchmark.num_steps=2",
        "benchmark.seeds_per_prompt=1",
        "benchmark.prompts_per_concept=1",
        *world_overrides(shapes_cache),
    ]
    summary = run_benchmark(compose_job("evaluate", overrides, out), out)
    assert trained == [str(shapes_cache)]  # reader_cache_dir defaults to the data cache
    with open(out / "fidelity.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["num_images"] == 4 * 4 * 3 + 8
    assert {r["concept"] for r in rows} == {NONE_CONCEPT, *ShapesWorldConfig().rare_concepts}
    metrics = json.loads((out / "metrics.json").read_text())
    rates = [v for k, v in metrics.items() if k.endswith(("_accuracy", "_rate")) and isinstance(v, float)]
    rates += list(metrics["per_concept_hit_rate"].values()) + list(
        metrics["reader_heldout_accuracy"].values()
    )
    assert len(rates) == 7 + 8 + 4 and all(0.0 <= r <= 1.0 for r in rates)
    assert metrics["sampler"] == {"name": "ddim", "num_steps": 2, "guidance_scale": 3.0}
    assert "| colour_accuracy |" in (out / "fidelity.md").read_text()
    assert (out / "fidelity_plain.png").is_file() and (out / "fidelity_rare.png").is_file()


def test_fidelity_needs_the_shapes_world(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    # reader_cache_dir given: its default interpolates data.cache_dir, which data=folder lacks.
    overrides = [
        "benchmark=fidelity",
        "data=folder",
        f"data.root={tmp_path}",
        f"benchmark.reader_cache_dir={tmp_path}",
    ]
    cfg = compose_job("evaluate", overrides, out)
    with pytest.raises(ValueError, match=r"needs data=shapes"):
        run_benchmark(cfg, out)


def test_attribute_reader_reads_held_out_images() -> None:
    """Trained briefly, the reader already reads colour and background of unseen images (shape and the
    rare textures need the full recipe; the benchmark prints those held-out accuracies)."""
    _, accuracy = train_attribute_reader(ShapesWorldConfig(), train_size=1280, test_size=256, epochs=2)
    assert accuracy["colour"] > 0.9 and accuracy["background"] > 0.9, accuracy
