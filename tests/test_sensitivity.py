"""method.sensitivity: each image's score taken relative to its mean (and spread) over a bank of
unlearned generated images, computed once per model and cached (seconds on a 48-image world)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from small_models import small_model, small_world

from diffusion_attribution.attribution.base import AttributionContext
from diffusion_attribution.attribution.queries import Query
from diffusion_attribution.attribution.unlearning import attributor as unlearning_attributor
from diffusion_attribution.attribution.unlearning.attributor import UnlearningAttributor
from diffusion_attribution.attribution.unlearning.sensitivity import SensitivitySettings, bank_queries
from diffusion_attribution.curvature.identity import IdentityCurvature

SETTINGS = {"num_samples": 4, "timesteps": [200, 600], "captions": [0], "batch_size": 32, "shard_size": 16}
BANK = {"bank_size": 2, "num_steps": 2}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    data = small_world(tmp_path_factory.mktemp("world"))
    model = small_model(data.source.all_captions()).eval()
    example = data.full_dataset().example(5)
    with torch.no_grad():
        latent = model.encode_images(example["pixel_values"][None])[0]
    return data, model, [Query(example["caption"], example["pixel_values"], latent)]


def scores(world: Any, root: Path, name: str, **sensitivity: Any) -> tuple[np.ndarray, UnlearningAttributor]:
    data, model, queries = world
    method = UnlearningAttributor(
        IdentityCurvature(), step_size=10.0, sensitivity=sensitivity or None, **SETTINGS
    )
    context = AttributionContext(root / "cache", root / name, {"enable_progress_bar": False}, 0)
    method.prepare(model, data, context)
    return method.score(queries), method


@pytest.mark.parametrize("correction", ["subtract", "standardize"])
def test_scores_are_taken_relative_to_the_bank(world, tmp_path: Path, correction: str) -> None:
    data, model, _ = world
    raw, _ = scores(world, tmp_path, "raw")
    corrected, method = scores(world, tmp_path, "corrected", **BANK, correction=correction)
    bank = bank_queries(model, data, SensitivitySettings(**BANK, correction=correction))
    plain = UnlearningAttributor(IdentityCurvature(), step_size=10.0, **SETTINGS)
    plain.prepare(
        model,
        data,
        AttributionContext(tmp_path / "cache", tmp_path / "bank", {"enable_progress_bar": False}, 0),
    )
    bank_scores = plain.score(bank)
    expected = raw - bank_scores.mean(0)
    if correction == "standardize":
        expected = expected / bank_scores.std(0, ddof=1)
    np.testing.assert_allclose(corrected, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    assert method.config()["sensitivity"]["bank_size"] == 2 and len(method.query_records) == 1


def test_the_bank_is_cached_per_model(world, tmp_path: Path, monkeypatch) -> None:
    first, _ = scores(world, tmp_path, "first", **BANK)
    assert len(list((tmp_path / "cache" / "sensitivity").glob("*.safetensors"))) == 1
    monkeypatch.setattr(
        unlearning_attributor, "bank_queries", lambda *a, **k: pytest.fail("recomputed the bank")
    )
    second, _ = scores(world, tmp_path, "second", **BANK)
    np.testing.assert_array_equal(first, second)


def test_bad_sensitivity_settings_name_the_key() -> None:
    with pytest.raises(ValueError, match="method.sensitivity.bank_size must be an integer >= 0"):
        UnlearningAttributor(IdentityCurvature(), sensitivity={"bank_size": -1})
    with pytest.raises(ValueError, match="Unknown method.sensitivity.correction='divide'"):
        UnlearningAttributor(IdentityCurvature(), sensitivity={"bank_size": 2, "correction": "divide"})
    with pytest.raises(ValueError, match="needs bank_size >= 2"):
        UnlearningAttributor(IdentityCurvature(), sensitivity={"bank_size": 1, "correction": "standardize"})
