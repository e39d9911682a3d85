"""Feature-similarity baselines (method=features, backbones pixel/clip/clip_text/dino/dinov2) and the
random ranking: an exact duplicate of the query ranks first with every backbone (tiny random-init
transformers models of the real classes, saved as their downloads are), bad backbone settings fail
early with the fix in the message, the training features are cached, reused and resumed, a store
made with other weights is refused, and attribute.py writes the score files end to end."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import hydra
import numpy as np
import pytest
import torch
from compose_jobs import compose_job
from fixtures_backbones import WRITERS, write_tiny_dino
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException

from diffusion_attribution.attribution.base import AttributionContext
from diffusion_attribution.attribution.features import FeatureAttributor
from diffusion_attribution.attribution.queries import Query
from diffusion_attribution.attribution.random_ranking import RandomAttributor
from diffusion_attribution.data.base import tensor_to_image
from diffusion_attribution.jobs.attribute import run_attribution
from diffusion_attribution.models import backbones
from diffusion_attribution.models.backbones import BackboneError, load_backbone

CPU_MODEL = SimpleNamespace(device=torch.device("cpu"))  # feature methods only ask the model its device
QUERY_IDS = [3, 70, 90]  # a common image and two rare-concept images of the 96-image tiny world


@pytest.fixture(autouse=True)
def clear_hydra():
    yield
    HydraConfig.instance().cfg = None


@pytest.fixture(scope="session")
def backbone_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backbones")
    written: dict[Path, Path] = {}
    dirs = {}
    for name, writer in WRITERS.items():
        target = root / writer.__name__
        if target not in written:
            written[target] = writer(target)
        dirs[name] = written[target]
    return dirs


def context(tmp_path: Path, seed: int = 0) -> AttributionContext:
    return AttributionContext(tmp_path / "cache", tmp_path / "run", {"enable_progress_bar": False}, seed)


def duplicate_queries(datamodule, ids: list[int], caption_index: int = 0) -> list[Query]:
    dataset = datamodule.full_dataset()
    queries = []
    for i in ids:
        example = dataset.example(i, caption_index)
        queries.append(Query(example["caption"], example["pixel_values"], torch.zeros(1)))
    return queries


# --------------------------------------------------------------------------------- duplicates first
@pytest.mark.parametrize("name", ["pixel", "clip", "dino", "dinov2"])
def test_an_exact_duplicate_ranks_first(name: str, backbone_dirs, make_shapes, tmp_path: Path) -> None:
    # An excluded id still gets its column (and ranks first for its own duplicate).
    datamodule = make_shapes(exclude=[QUERY_IDS[1]])
    path = None if name == "pixel" else backbone_dirs[name]
    attributor = FeatureAttributor({"name": name, "path": path}, batch_size=16, shard_size=40)
    attributor.prepare(CPU_MODEL, datamodule, context(tmp_path))
    scores = attributor.score(duplicate_queries(datamodule, QUERY_IDS))

    assert scores.shape == (len(QUERY_IDS), datamodule.num_examples) and scores.dtype == np.float32
    assert attributor.name == f"features:{name}"
    for row, i in zip(scores, QUERY_IDS, strict=True):
        assert row[i] == pytest.approx(1.0, abs=1e-5)
        others = np.delete(row, i)
        assert int(np.argmax(row)) == i and others.max() < row[i] - 1e-4, (name, i, others.max())
        assert others.min() < row[i] - 1e-2  # the features tell images apart at all
    assert attributor.train_side_bytes() > 0
    assert attributor.config()["backbone"] == name


def test_clip_text_ranks_an_example_with_the_query_caption_first(
    backbone_dirs, shapes, tmp_path: Path
) -> None:
    attributor = FeatureAttributor({"name": "clip_text", "path": backbone_dirs["clip_text"]}, batch_size=32)
    attributor.prepare(CPU_MODEL, shapes, context(tmp_path))
    queries = duplicate_queries(shapes, QUERY_IDS, caption_index=1)
    scores = attributor.score(queries)
    source = shapes.source
    for row, i, query in zip(scores, QUERY_IDS, queries, strict=True):
        assert row[i] == pytest.approx(1.0, abs=1e-5) and row[i] >= row.max() - 1e-6
        # Ties only with examples that have that very caption (the world repeats attribute combinations).
        top = np.flatnonzero(row >= row[i] - 1e-5)
        assert all(query.caption in source.captions(int(j)) for j in top), top
        without = [j for j in range(len(row)) if query.caption not in source.captions(j)]
        assert row[without].max() < row[i] - 1e-4
    assert attributor.config()["caption_reduction"] == "max"


# --------------------------------------------------------------------------------- bad settings
def test_bad_backbone_settings_fail_with_the_fix(backbone_dirs, tmp_path: Path) -> None:
    def method(*overrides: str):
        cfg = compose_job("attribute", ["model.path=x", "method=features", *overrides], tmp_path)
        return hydra.utils.instantiate(cfg.method)

    assert method().backbone_name == "pixel"  # the default backbone
    assert method("method=pixel").name == "features:pixel"
    with pytest.raises(InstantiationException, match=r"Unknown backbone 'resnet'. Options: pixel .*dinov2"):
        method("backbone.name=resnet")
    with pytest.raises(
        InstantiationException,
        match=r"backbone=clip needs its weights: backbone.path is not set. Download openai/clip-vit-base-patch32",
    ):
        method("backbone=clip")
    with pytest.raises(
        InstantiationException,
        match=r"backbone.path=\S*nowhere does not exist. Download facebook/dino-vitb16",
    ):
        method("backbone=dino", f"backbone.path={tmp_path / 'nowhere'}")
    with pytest.raises(
        InstantiationException, match=r"holds a 'vit' model but backbone=dinov2 needs .*dinov2-base"
    ):
        method("backbone=dinov2", f"backbone.path={backbone_dirs['dino']}")
    with pytest.raises(InstantiationException, match=r"holds no config.json"):
        method("backbone=clip_text", f"backbone.path={tmp_path}")
    with pytest.raises(BackboneError, match=r"backbone=dino has no text features"):
        load_backbone("dino", backbone_dirs["dino"]).text_features(["a red circle"])


# --------------------------------------------------------------------------------- cache
def test_training_features_are_cached_resumed_and_refused_for_other_weights(
    backbone_dirs, shapes, monkeypatch, tmp_path: Path
) -> None:
    computed: list[int] = []
    inner = backbones.ClsTokenBackbone.image_features

    def counted(self, pixels):
        computed.append(len(pixels))
        return inner(self, pixels)

    monkeypatch.setattr(backbones.ClsTokenBackbone, "image_features", counted)
    config = {"name": "dino", "path": backbone_dirs["dino"]}
    first = FeatureAttributor(config, batch_size=32, shard_size=40)
    first.prepare(CPU_MODEL, shapes, context(tmp_path))
    assert sum(computed) == shapes.num_examples
    shards = sorted(first.store_dir.glob("shard_*.safetensors"))
    assert len(shards) == 3  # 96 examples in shards of 40

    computed.clear()
    again = FeatureAttributor(config, batch_size=8, shard_size=40)  # batch size is not part of the key
    again.prepare(CPU_MODEL, shapes, context(tmp_path))
    assert computed == [] and again.store_dir == first.store_dir
    assert torch.equal(again.features, first.features)

    shards[1].unlink()  # a run killed before its second shard: only that shard is computed again
    again.prepare(CPU_MODEL, shapes, context(tmp_path))
    assert sum(computed) == 40 and torch.allclose(again.features, first.features, atol=1e-6)

    other_weights = write_tiny_dino(tmp_path / "other_dino", seed=5)
    other = FeatureAttributor({"name": "dino", "path": other_weights}, shard_size=40)
    other.prepare(CPU_MODEL, shapes, context(tmp_path))  # the default store is keyed by the weights
    assert other.store_dir != first.store_dir
    pinned = FeatureAttributor(
        {"name": "dino", "path": other_weights}, shard_size=40, store=str(first.store_dir)
    )
    with pytest.raises(ValueError, match=r"already holds results of a different run .*refusing to mix"):
        pinned.prepare(CPU_MODEL, shapes, context(tmp_path))


# --------------------------------------------------------------------------------- random
def test_random_ranking_is_seeded(make_shapes, tmp_path: Path) -> None:
    datamodule = make_shapes(exclude=[0, 1])
    queries = duplicate_queries(datamodule, [5, 6, 7])

    def ranked(seed: int) -> np.ndarray:
        attributor = RandomAttributor()
        attributor.prepare(CPU_MODEL, datamodule, context(tmp_path, seed))
        assert attributor.config() == {"seed": seed} and attributor.train_side_bytes() == 0
        return attributor.score(queries)

    scores = ranked(0)
    assert scores.shape == (3, datamodule.num_examples) and scores.dtype == np.float32
    assert np.array_equal(scores, ranked(0))
    assert not np.array_equal(scores, ranked(1))
    assert not np.array_equal(np.argsort(scores[0]), np.argsort(scores[1]))  # queries differ
    assert len(np.unique(scores[0])) == datamodule.num_examples  # no ties
    # Keyed by the query, not its position: separate runs (one per AbC concept, say) do not all get
    # the same permutation for their first query, and a query keeps its ranking in any position.
    attributor = RandomAttributor()
    attributor.prepare(CPU_MODEL, datamodule, context(tmp_path, 0))
    assert np.array_equal(attributor.score(queries[::-1]), scores[::-1])
    assert np.array_equal(attributor.score(queries[1:2])[0], scores[1])


# --------------------------------------------------------------------------------- end to end
def test_attribute_job_with_a_transformers_backbone(
    backbone_dirs, make_tiny_model, shapes, shapes_cache: Path, tmp_path: Path
) -> None:
    checkpoint = make_tiny_model().save_pretrained(tmp_path / "model")
    dataset = shapes.full_dataset()
    images = []
    for i in QUERY_IDS:
        images.append(tmp_path / f"query_{i}.png")
        tensor_to_image(dataset.example(i)["pixel_values"]).save(images[-1])
    captions = [dataset.example(i)["caption"] for i in QUERY_IDS]
    run_dir = tmp_path / "run"
    overrides = [
        f"model.path={checkpoint}",
        "data.num_common=64",
        "data.images_per_rare_concept=4",
        f"data.cache_dir={shapes_cache}",
        f"cache_dir={tmp_path / 'cache'}",
        "method=features",
        "backbone=dinov2",
        f"backbone.path={backbone_dirs['dinov2']}",
        f"query.images=[{','.join(str(p) for p in images)}]",
        f"query.captions=[{','.join(repr(c) for c in captions)}]",
        "trainer.enable_progress_bar=false",
    ]
    scores = run_attribution(compose_job("attribute", overrides, run_dir), run_dir)
    import json

    assert np.array_equal(np.load(run_dir / "scores.npy"), scores)
    assert list(scores.argmax(axis=1)) == QUERY_IDS
    ranking = json.loads((run_dir / "ranking.json").read_text())
    assert ranking["method"] == "features:dinov2"
    assert ranking["method_config"]["path"] == str(backbone_dirs["dinov2"])
    stored = sum(p.stat().st_size for p in (tmp_path / "cache" / "features").rglob("*") if p.is_file())
    assert ranking["train_side_mb"] == pytest.approx(stored / 2**20)
    assert set(ranking["timing"]) == {"prepare_s", "score_s"}
    assert [q["top_k"][0]["id"] for q in ranking["queries"]] == QUERY_IDS
    assert (run_dir / "ranking.png").is_file()
