"""The embedded AbC benchmark (data/abc_embedded.py): deterministic exemplars with the token in the
right caption slot, the build (customized models, queries) cached by what made it, the pool's ids
(base training set unchanged, then the exemplars), and attribute.py + evaluate.py benchmark=abc on it
end to end with a small model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from compose_jobs import compose_job
from hydra.core.hydra_config import HydraConfig
from small_models import small_model

from diffusion_attribution.data.abc_embedded import (
    FRAME,
    OBJECT_COLOURS,
    OBJECT_CONCEPTS,
    STYLE_CONCEPTS,
    TOKEN,
    AbcEmbeddedDataModule,
    query_prompts,
    render_exemplars,
)
from diffusion_attribution.data.base import DataError
from diffusion_attribution.data.shapes import BACKGROUNDS, COLOURS, CONCEPT_COLOURS, ShapesDataModule
from diffusion_attribution.evaluation import abc_embedded_build
from diffusion_attribution.evaluation.abc_embedded_build import (
    AbcEmbeddedSettings,
    base_data_settings,
    build_abc_embedded,
)
from diffusion_attribution.jobs.attribute import run_attribution
from diffusion_attribution.jobs.evaluate import run_benchmark
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.models.tokenizer import caption_words

RESOLUTION = 16
WORLD = {"num_common": 24, "images_per_rare_concept": 2, "rare_concepts": ["striped", "hollow"]}
SETTINGS = AbcEmbeddedSettings(
    objects=("star",),
    styles=("sepia",),
    exemplars_per_concept=3,
    queries_per_concept=2,
    steps=2,
    batch_size=2,
    regularization_batch_size=2,
    regularization_size=4,
    sampler={"num_steps": 2, "guidance_scale": 3.0, "sampler": "ddim"},
)


@pytest.fixture(autouse=True)
def clear_hydra():
    yield
    HydraConfig.instance().cfg = None


def test_exemplars_are_deterministic_and_captioned_with_the_token() -> None:
    for name in OBJECT_CONCEPTS + STYLE_CONCEPTS:
        images, records = render_exemplars(name, 5, seed=0)
        again, _ = render_exemplars(name, 5, seed=0)
        other, _ = render_exemplars(name, 5, seed=1)
        assert all(np.array_equal(a, b) for a, b in zip(images, again, strict=True))
        assert not all(np.array_equal(a, b) for a, b in zip(images, other, strict=True))
        words = caption_words(records[0]["text"][0])
        assert TOKEN in words  # one word for the tokenizer and the vocabulary check
        slot = words.index(TOKEN)
        if name in OBJECT_CONCEPTS:  # "a <colour> <new1> on ...": the shape word's place
            assert words[slot - 1] in ("red", "green", "blue", "yellow") and words[slot + 1] == "on"
        else:  # "a <new1> <colour> <shape> on ...": the rare-concept adjective's place
            assert words[slot - 1] == "a" and words[slot + 2] in ("circle", "square", "triangle", "cross")
    # An object concept is one instance: one colour in every exemplar and query, backgrounds vary.
    for name in OBJECT_CONCEPTS:
        _, records = render_exemplars(name, 6, seed=0)
        colour = OBJECT_COLOURS[name]
        assert {r["colour"] for r in records} == {colour} and len({r["background"] for r in records}) == 3
        assert all(f"a {colour} {TOKEN} on" in p for p, _ in query_prompts(name, 4, seed=0))
    stars, _ = render_exemplars("star", 3, seed=0)
    inverted, _ = render_exemplars("inverted", 3, seed=0)
    assert not np.array_equal(stars[0], inverted[0])
    with pytest.raises(DataError, match="Unknown"):
        render_exemplars("zigzag", 3, seed=0)


def test_frame_is_a_colour_neither_world_uses() -> None:
    images, records = render_exemplars("framed", 3, seed=0)
    assert tuple(images[0][0, 0]) == FRAME
    used = {*COLOURS.values(), *BACKGROUNDS.values(), *CONCEPT_COLOURS.values(), (255, 255, 255)}
    assert min(np.abs(np.subtract(FRAME, c)).sum() for c in used) > 100


def test_distractors_are_the_world_the_base_was_trained_on(tmp_path: Path, shapes_cache: Path) -> None:
    """A base trained on the distinct world gets the distinct world as its distractor pool; one trained
    before the setting existed (no key in its training config) keeps ShapesDataModule's white."""
    world = {**WORLD, "cache_dir": str(shapes_cache)}
    captions = ShapesDataModule(**world, resolution=RESOLUTION).source.all_captions()
    model = small_model(captions)
    target = "diffusion_attribution.data.shapes.ShapesDataModule"
    distinct = model.save_pretrained(
        tmp_path / "distinct", config={"data": {"_target_": target, **world, "concept_colours": "distinct"}}
    )
    old = model.save_pretrained(tmp_path / "old", config={"data": {"_target_": target, **world}})
    assert base_data_settings(distinct)["concept_colours"] == "distinct"
    assert "concept_colours" not in base_data_settings(old)
    pools = [ShapesDataModule(**base_data_settings(c), resolution=RESOLUTION) for c in (distinct, old)]
    assert [p.world.concept_colours for p in pools] == ["distinct", "white"]
    striped = next(i for i in range(pools[0].num_examples) if "striped" in pools[0].source.captions(i)[0])
    a, b = (p.full_dataset().example(striped)["pixel_values"] for p in pools)
    assert not torch.equal(a, b)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, shapes_cache: Path) -> tuple[Path, int]:
    """A tiny benchmark (1 object + 1 style concept) on a random-init small base model."""
    world = {**WORLD, "cache_dir": str(shapes_cache)}
    shapes = ShapesDataModule(**world, resolution=RESOLUTION)
    model = small_model(shapes.source.all_captions())
    data_cfg = {"_target_": "diffusion_attribution.data.shapes.ShapesDataModule", **world}
    base = model.save_pretrained(tmp_path_factory.mktemp("base") / "checkpoint", config={"data": data_cfg})
    root = build_abc_embedded(base, tmp_path_factory.mktemp("abc"), SETTINGS)
    return root, shapes.num_examples


def test_build_writes_models_queries_and_ground_truth(built: tuple[Path, int], monkeypatch) -> None:
    root, num_distractors = built
    info = json.loads((root / "benchmark.json").read_text())
    assert info["num_distractors"] == num_distractors and info["concepts"] == {
        "star": "object",
        "sepia": "style",
    }
    for name in ("star", "sepia"):
        queries = [json.loads(line) for line in (root / name / "queries.jsonl").read_text().splitlines()]
        assert len(queries) == 2 and all(TOKEN in q["prompt"] for q in queries)
        assert all(
            q["relevant_ids"] == [num_distractors, num_distractors + 1, num_distractors + 2] for q in queries
        )
        model = TextToImageModel.from_pretrained(root / name / "model")
        assert TOKEN in model.tokenizer.get_vocab()
        assert (root / name / "queries.png").is_file() and (
            root / name / "model" / "customization.safetensors"
        ).is_file()
    # Cached: a second build finds every concept and customizes nothing.
    monkeypatch.setattr(
        abc_embedded_build, "customize_concept", lambda *a, **k: pytest.fail("rebuilt a cached concept")
    )
    assert build_abc_embedded(info["base_checkpoint"], root.parent, SETTINGS) == root


def test_calibration_queries_have_their_own_seeds_and_ids(built: tuple[Path, int]) -> None:
    root, num_distractors = built
    for name in ("star", "sepia"):
        evaluation = [json.loads(line) for line in (root / name / "queries.jsonl").read_text().splitlines()]
        calibration = [
            json.loads(line) for line in (root / name / "calibration_queries.jsonl").read_text().splitlines()
        ]
        assert len(calibration) == 4 and all(TOKEN in q["prompt"] for q in calibration)
        assert {q["seed"] for q in calibration}.isdisjoint(q["seed"] for q in evaluation)
        assert all(q["relevant_ids"] == evaluation[0]["relevant_ids"] for q in calibration)
        ids = [int(line) for line in (root / name / "calibration_ids.txt").read_text().split()]
        assert ids == sorted(set(ids)) and set(evaluation[0]["relevant_ids"]) <= set(ids)
        assert len(ids) == min(300, num_distractors) + 3 and max(ids) < num_distractors + 3


def test_pool_is_the_base_set_then_the_exemplars(built: tuple[Path, int], shapes_cache: Path) -> None:
    root, num_distractors = built
    pool = AbcEmbeddedDataModule(str(root), "sepia", resolution=RESOLUTION)
    base = ShapesDataModule(**WORLD, cache_dir=str(shapes_cache), resolution=RESOLUTION)
    assert pool.num_examples == num_distractors + 3 and pool.exemplar_ids == [
        num_distractors + k for k in range(3)
    ]
    full, base_full = pool.full_dataset(), base.full_dataset()
    for i in (0, 7, num_distractors - 1):
        assert pool.source.captions(i) == base.source.captions(i)
        assert torch.equal(full.example(i)["pixel_values"], base_full.example(i)["pixel_values"])
    assert all(TOKEN in pool.source.captions(i)[0] for i in pool.exemplar_ids)
    with pytest.raises(DataError, match="not in"):
        AbcEmbeddedDataModule(str(root), "heart", resolution=RESOLUTION).build_source()


def test_attribute_and_evaluate_on_the_built_benchmark(built: tuple[Path, int], tmp_path: Path) -> None:
    root, num_distractors = built
    runs = []
    for method in ("unlearning", "random"):
        run_dir = tmp_path / method
        cfg = compose_job(
            "attribute",
            [
                "experiment=abc_embedded",
                f"method={method}",
                f"data.root={root}",
                "data.concept=star",
                f"model.path={root / 'star' / 'model'}",
                f"model.resolution={RESOLUTION}",
                f"query.file={root / 'star' / 'queries.jsonl'}",
                "query.sampler.num_steps=2",
                f"cache_dir={tmp_path / 'cache'}",
                "trainer.enable_progress_bar=false",
                *(
                    [
                        "method.timesteps=[200,600]",
                        "method.num_samples=4",
                        "method.steps=1",
                        "method.batch_size=16",
                    ]
                    if method == "unlearning"
                    else []
                ),
            ],
            run_dir,
        )
        scores = run_attribution(cfg, run_dir)
        assert scores.shape == (2, num_distractors + 3) and np.isfinite(scores).all()
        records = json.loads((run_dir / "ranking.json").read_text())["queries"]
        assert records[0]["concept_type"] == "object" and records[0]["relevant_ids"][0] == num_distractors
        runs.append(str(run_dir))
        HydraConfig.instance().cfg = None
    eval_dir = tmp_path / "eval"
    summary = run_benchmark(
        compose_job("evaluate", ["benchmark=abc", f"scores=[{','.join(runs)}]"], eval_dir), eval_dir
    )
    assert {r["method"] for r in summary["summary"]} == {"unlearning", "random"}
    assert (eval_dir / "abc.png").is_file()
