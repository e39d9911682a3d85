"""method/candidates: per-query shortlists for the unlearning attributor (FastGDA's pruning).

On a 48-image world and a seeded random tiny model (seconds): a shortlist of every example gives the
full scores exactly; shortlisted scores equal the unpruned method's on those ids (keyed noise) and
off-list examples rank below them; the before-sweep covers only the union of the shortlists (or
reuses the cached full sweep); bad settings fail before any sweep; the scores ranker refuses a run of
another model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytest
import torch
from compose_jobs import compose_job
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException, MissingConfigException
from small_models import small_model, small_world

from diffusion_attribution.attribution.base import AttributionContext
from diffusion_attribution.attribution.candidates import (
    CandidateError,
    CaptionRanker,
    FeatureRanker,
    ScoresRanker,
    UnionRanker,
)
from diffusion_attribution.attribution.queries import Query
from diffusion_attribution.attribution.unlearning import attributor as unlearning_attributor
from diffusion_attribution.attribution.unlearning.attributor import UnlearningAttributor
from diffusion_attribution.curvature.identity import IdentityCurvature
from diffusion_attribution.objective import sweep as loss_sweep
from diffusion_attribution.utils.fingerprint import model_fingerprint

QUERY_IDS = [5, 33]  # training images queried with their own captions
RELEVANT = [[5, 6, 40], [33]]
PIXEL = {"name": "pixel", "path": None}
STEP_SIZE = 10.0  # identity curvature: scores ~1e-3, far above the float32 rounding of the losses (~1e-7)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    data = small_world(tmp_path_factory.mktemp("world"))
    model = small_model(data.source.all_captions()).eval()
    dataset = data.full_dataset()
    queries = []
    for i, relevant in zip(QUERY_IDS, RELEVANT, strict=True):
        example = dataset.example(i)
        image = example["pixel_values"]
        with torch.no_grad():
            latent = model.encode_images(image[None])[0]
        queries.append(Query(example["caption"], image, latent, None, {"relevant_ids": relevant}))
    return data, model, queries


@pytest.fixture(autouse=True)
def clear_hydra():
    yield
    HydraConfig.instance().cfg = None


def attributor(candidates: Any = None) -> UnlearningAttributor:
    return UnlearningAttributor(
        curvature=IdentityCurvature(),
        step_size=STEP_SIZE,
        num_samples=4,
        timesteps=[200, 600],
        captions=[0],
        batch_size=32,
        shard_size=16,
        candidates=candidates,
    )


def run(
    world: Any, root: Path, name: str, candidates: Any = None, cache: str = "cache", ids: Any = None
) -> tuple:
    data, model, queries = world
    method = attributor(candidates)
    context = AttributionContext(
        root / cache,
        root / name,
        {"accelerator": "cpu", "enable_progress_bar": False},
        seed=0,
        candidate_ids=None if ids is None else np.asarray(ids),
    )
    method.prepare(model, data, context)
    return method.score(queries), method


def swept_ids(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    inner = loss_sweep.per_sample_losses

    def counted(model, dataset, ids, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.extend(int(i) for i in ids)
        return inner(model, dataset, ids, *args, **kwargs)

    monkeypatch.setattr(loss_sweep, "per_sample_losses", counted)
    return calls


def no_sweeps(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a loss sweep ran before the settings were checked")

    monkeypatch.setattr(loss_sweep, "per_sample_losses", refuse)


# --------------------------------------------------------------------------------- the scores
def test_a_shortlist_of_every_example_gives_the_full_scores(world, tmp_path: Path) -> None:
    full, _ = run(world, tmp_path, "full")
    every, method = run(world, tmp_path, "every", FeatureRanker(k=1.0, backbone=PIXEL), cache="fresh")
    assert np.array_equal(every, full)
    assert method.query_records[0]["candidates"]["count"] == world[0].num_examples


def test_shortlisted_scores_are_the_full_methods_and_the_rest_rank_below(
    world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = world[0]
    full, _ = run(world, tmp_path, "full")
    calls = swept_ids(monkeypatch)
    # a fresh cache: the before-sweep covers the union of the shortlists, nothing else
    pruned, method = run(world, tmp_path, "pruned", FeatureRanker(k=6, backbone=PIXEL), cache="fresh")
    records = [r["candidates"] for r in method.query_records]
    shortlists = [np.asarray(r["ids"]) for r in records]
    union = np.unique(np.concatenate(shortlists))
    assert sorted(set(calls)) == union.tolist() and len(union) < data.num_examples
    assert method.before_ids.tolist() == union.tolist()
    for q, ids in enumerate(shortlists):
        assert len(ids) == 6 and QUERY_IDS[q] in ids  # a training image is its own nearest pixel neighbour
        # equal up to float32 rounding of the losses (batches are composed differently)
        np.testing.assert_allclose(pruned[q, ids], full[q, ids], rtol=0, atol=1e-6)
        off = np.setdiff1d(np.arange(data.num_examples), ids)
        assert np.isfinite(pruned[q]).all() and pruned[q, off].max() < pruned[q, ids].min()
        assert len(set(pruned[q, off].tolist())) == 1  # one value below all, ties kept in id order
    # diagnostics: ranker and settings, k, ids, after-sweep time, recall of the relevant ids
    assert records[0]["ranker"] == {
        "ranker": "features",
        "k": 6,
        "count": 6,
        "backbone": "pixel",
        "path": None,
        "weights": records[0]["ranker"]["weights"],
    }
    assert method.query_records[0]["sweep_after_s"] > 0
    for record, relevant, ids in zip(records, RELEVANT, shortlists, strict=True):
        inside = np.isin(relevant, ids)
        assert record["recall"]["fraction"] == pytest.approx(inside.mean())
        assert record["recall"]["in_shortlist"] == int(inside.sum())
    # with the full before-sweep cached (the "full" run's cache), only the after-sweeps run
    calls.clear()
    again, method = run(world, tmp_path, "reuse", FeatureRanker(k=6, backbone=PIXEL))
    assert method.before_ids.tolist() == list(range(data.num_examples))
    assert sorted(set(calls)) == union.tolist()
    assert np.array_equal(again, pruned)


def test_long_shortlists_are_saved_and_union_and_captions_rank(
    world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, queries = world
    union = UnionRanker(
        {"pixel": FeatureRanker(k=0.05, backbone=PIXEL), "captions": CaptionRanker(k=3, batch_size=7)}
    )
    scores, method = run(world, tmp_path, "union", union)
    members = union.member_shortlists
    for q, record in enumerate(method.query_records):
        ids = np.asarray(record["candidates"]["ids"])
        assert ids.tolist() == np.union1d(members["pixel"][q], members["captions"][q]).tolist()
        assert 3 <= len(ids) <= 6 and QUERY_IDS[q] in members["captions"][q]
        assert set(record["candidates"]["recall"]["members"]) == {"pixel", "captions"}
    # the query's own caption is its best match in the model's text encoder
    similarity = union.members["captions"].similarity(queries)
    assert similarity[0, QUERY_IDS[0]] == pytest.approx(1.0, abs=1e-5)
    assert similarity[0, QUERY_IDS[0]] >= similarity[0].max() - 1e-6
    # long shortlists go to a .npy in the run directory, their count in ranking.json
    monkeypatch.setattr(unlearning_attributor, "MAX_INLINE_IDS", 10)
    _, method = run(world, tmp_path, "long", FeatureRanker(k=12, backbone=PIXEL))
    record = method.query_records[1]["candidates"]
    assert "ids" not in record and record["count"] == 12
    saved = np.load(record["ids_file"])
    assert Path(record["ids_file"]).parent == tmp_path / "long" / "candidates"
    assert len(saved) == 12 and QUERY_IDS[1] in saved


def test_shortlists_stay_inside_score_ids(world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With score_ids the pool is those ids: shortlists come from them, k counts within them."""
    subset = [1, 4, 5, 9, 20, 33, 34, 47]
    calls = swept_ids(monkeypatch)
    scores, method = run(world, tmp_path, "subset", FeatureRanker(k=0.5, backbone=PIXEL), ids=subset)
    for q, record in enumerate(method.query_records):
        ids = record["candidates"]["ids"]
        assert len(ids) == 4 and set(ids) <= set(subset) and QUERY_IDS[q] in ids
    assert set(calls) <= set(subset)
    with pytest.raises(CandidateError, match="above the 8 examples"):
        run(world, tmp_path, "too_many", FeatureRanker(k=9, backbone=PIXEL), ids=subset)


# ------------------------------------------------------------------------------ bad settings
@pytest.mark.parametrize(
    ("k", "message"),
    [
        (0, r"method\.candidates\.k=0 must be positive"),
        (-3, "must be positive"),
        (1.5, "fraction above 1"),
        ("ten", "must be a count"),
    ],
)
def test_a_bad_k_is_refused_when_the_config_is_read(k: Any, message: str) -> None:
    with pytest.raises(CandidateError, match=message):
        FeatureRanker(k=k, backbone=PIXEL)


def test_bad_settings_fail_before_any_sweep(world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_sweeps(monkeypatch)
    n = world[0].num_examples
    with pytest.raises(CandidateError, match=rf"method\.candidates\.k=1000 is above the {n} examples"):
        run(world, tmp_path, "a", FeatureRanker(k=1000, backbone=PIXEL))
    union = UnionRanker({"pixel": FeatureRanker(k=2, backbone=PIXEL), "captions": CaptionRanker(k=n + 1)})
    with pytest.raises(CandidateError, match=r"method\.candidates\.rankers\.captions\.k"):
        run(world, tmp_path, "b", union)
    with pytest.raises(CandidateError, match="backbone.*needs its weights"):
        FeatureRanker(k=3, backbone={"name": "dino", "path": None})
    with pytest.raises(CandidateError, match="rankers is empty"):
        UnionRanker({})


def test_hydra_lists_the_rankers_and_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(MissingConfigException, match="(?s)captions.*features.*none.*scores.*union"):
        compose_job("attribute", ["model.path=x", "method/candidates=dtrak"], tmp_path / "run")
    HydraConfig.instance().cfg = None
    cfg = compose_job(
        "attribute",
        ["model.path=x", "method=unlearning_ekfac", "method/candidates=features", "method.candidates.k=0"],
        tmp_path / "run",
    )
    with pytest.raises(InstantiationException, match=r"method\.candidates\.k=0 must be positive"):
        hydra.utils.instantiate(cfg.method)
    HydraConfig.instance().cfg = None
    cfg = compose_job(
        "attribute",
        [
            "model.path=x",
            "method/candidates=union",
            "method.candidates.rankers.features.backbone.name=pixel",
            "method.candidates.rankers.captions.k=7",
        ],
        tmp_path / "run",
    )
    method = hydra.utils.instantiate(cfg.method)
    assert set(method.candidates.members) == {"features", "captions"}
    assert method.candidates.members["captions"].k == 7
    HydraConfig.instance().cfg = None
    assert hydra.utils.instantiate(
        compose_job("attribute", ["model.path=x"], tmp_path / "r").method
    ).candidates.everything


# ------------------------------------------------------------------------------ the scores ranker
def scores_run(folder: Path, world: Any, **ranking: Any) -> Path:
    data, _, queries = world
    folder.mkdir(parents=True)
    scores = np.zeros((len(queries), data.num_examples), dtype=np.float32)
    scores[0, [40, 2, 17]] = [3.0, 2.0, 1.0]
    scores[1, [9, 33, 11]] = [3.0, 2.0, 1.0]
    np.save(folder / "scores.npy", scores)
    record = {
        "method": "dtrak",
        "num_examples": data.num_examples,
        "queries": [{"caption": q.caption} for q in queries],
    }
    (folder / "ranking.json").write_text(json.dumps({**record, **ranking}))
    return folder


def test_the_scores_ranker_refuses_another_models_run(
    world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, model, _ = world
    other = scores_run(tmp_path / "other", world, model="/models/other")
    no_sweeps(monkeypatch)
    with pytest.raises(CandidateError, match="scored model /models/other, not this run's /models/this"):
        run(world, tmp_path, "a", ScoresRanker(k=2, run=str(other), model_path="/models/this"))
    fingerprinted = scores_run(tmp_path / "fp", world, model="/models/this", model_fingerprint="0123abcd")
    with pytest.raises(CandidateError, match="another model.*0123abcd"):
        run(world, tmp_path, "b", ScoresRanker(k=2, run=str(fingerprinted), model_path="/models/this"))
    smaller = scores_run(
        tmp_path / "smaller", world, model="/models/this", num_examples=data.num_examples - 1
    )
    with pytest.raises(CandidateError, match=f"scored {data.num_examples - 1} training examples"):
        run(world, tmp_path, "c", ScoresRanker(k=2, run=str(smaller), model_path="/models/this"))
    with pytest.raises(CandidateError, match="holds no scores.npy"):
        ScoresRanker(k=2, run=str(tmp_path / "nowhere"))
    with pytest.raises(CandidateError, match=r"method\.candidates\.run is not set"):
        ScoresRanker(k=2)


def test_the_scores_ranker_shortlists_the_runs_top_k(world, tmp_path: Path) -> None:
    _, model, _ = world
    same = scores_run(tmp_path / "same", world, model="elsewhere", model_fingerprint=model_fingerprint(model))
    _, method = run(world, tmp_path, "run", ScoresRanker(k=2, run=str(same), model_path="/models/this"))
    assert [r["candidates"]["ids"] for r in method.query_records] == [[2, 40], [9, 33]]
    assert method.query_records[1]["candidates"]["recall"]["fraction"] == 1.0
