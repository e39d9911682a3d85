"""The diagonal empirical Fisher: exact per-sample gradients, keyed draws, shards, files, checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from small_models import SMALLER, small_model, small_world

from diffusion_attribution.curvature.base import FisherError
from diffusion_attribution.curvature.diagonal import (
    FisherDiagonal,
    accumulate_fisher,
    all_reduce_fisher_sums,
    compute_fisher,
)
from diffusion_attribution.data.base import CaptionedImageDataset
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.models.weight_subsets import select_parameters
from diffusion_attribution.objective.draws import fisher_draw


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory):
    data = small_world(tmp_path_factory.mktemp("shapes"))
    return data.source


@pytest.fixture(scope="module")
def model(source) -> TextToImageModel:
    return small_model(source.all_captions())


def brute_force_fisher(
    model: TextToImageModel, dataset: CaptionedImageDataset, ids: list[int], subset: str, seed: int
) -> dict[str, torch.Tensor]:
    """One example at a time, plain autograd: loss.backward(), square the .grad, average."""
    params = select_parameters(model.unet, subset)
    totals = {name: torch.zeros_like(p) for name, p in params.items()}
    num_timesteps = model.scheduler.config.num_train_timesteps
    for example_id in ids:
        draw = fisher_draw(
            seed,
            example_id,
            0,
            len(dataset.source.captions(example_id)),
            num_timesteps,
            model.latent_shape,
            dataset.random_flip,
        )
        example = dataset.example(example_id, draw.caption_index, draw.flip)
        latents = model.encode_images(example["pixel_values"][None])
        noise, timestep = draw.noise[None], torch.tensor([draw.timestep])
        with torch.no_grad():
            text = model.encode_text([example["caption"]])
        model.unet.zero_grad()
        prediction = model.predict(model.add_noise(latents, noise, timestep), timestep, text)
        loss = ((prediction - model.target(latents, noise, timestep)) ** 2).mean()
        loss.backward()
        for name, p in params.items():
            totals[name] += p.grad.detach() ** 2
    model.unet.zero_grad()
    return {name: total / len(ids) for name, total in totals.items()}


def assert_fisher_close(
    actual: FisherDiagonal, expected: dict[str, torch.Tensor], rtol: float = 1e-4
) -> None:
    assert set(actual.names) == set(expected)
    for name, value in expected.items():
        scale = float(value.abs().max())
        torch.testing.assert_close(actual[name], value, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize(
    ("prediction_type", "subset", "flip"),
    [("v_prediction", "kv", True), ("epsilon", "cross_attn", False)],
)
def test_equals_brute_force_loop(source, prediction_type: str, subset: str, flip: bool) -> None:
    model = small_model(source.all_captions(), prediction_type=prediction_type)
    dataset = CaptionedImageDataset(source, SMALLER["resolution"], random_flip=flip)
    ids = [0, 3, 7, 12, 21, 40]
    fisher = compute_fisher(model, dataset, ids, subset, batch_size=4, seed=5, progress=False)
    assert_fisher_close(fisher, brute_force_fisher(model, dataset, ids, subset, seed=5))
    assert fisher.metadata["num_examples"] == len(ids)
    assert fisher.metadata["random_flip"] is flip
    looped = compute_fisher(model, dataset, ids, subset, batch_size=4, seed=5, method="loop", progress=False)
    assert_fisher_close(looped, fisher.values)


def test_independent_of_batch_size_and_order(model, source) -> None:
    dataset = CaptionedImageDataset(source, SMALLER["resolution"], random_flip=True)
    ids = list(range(20))
    small = compute_fisher(model, dataset, ids, "kv", batch_size=3, seed=1, progress=False)
    shuffled = [ids[i] for i in torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]
    large = compute_fisher(model, dataset, shuffled, "kv", batch_size=16, seed=1, progress=False)
    assert_fisher_close(large, small.values, rtol=1e-5)
    other_seed = compute_fisher(model, dataset, ids, "kv", batch_size=16, seed=2, progress=False)
    assert not torch.allclose(other_seed[small.names[0]], small[small.names[0]])


def test_shards_sum_to_the_whole(model, source, tmp_path: Path) -> None:
    dataset = CaptionedImageDataset(source, SMALLER["resolution"])
    ids = list(range(10))
    whole = compute_fisher(model, dataset, ids, "kv", batch_size=8, progress=False)
    first = accumulate_fisher(model, dataset, ids[:4], "kv", batch_size=8, progress=False)
    second = accumulate_fisher(model, dataset, ids[4:], "kv", batch_size=8, progress=False)
    merged = first.merge(second)
    assert merged.count == len(ids)
    # The shards batch the examples differently from the whole (4 + 6 against 8 + 2), and float32
    # per-sample gradients move with the batch's composition at the 1e-6 level on some CPUs (2.8e-6 seen);
    # a wrong merge (a lost shard, a wrong count) is off by tens of percent.
    assert_fisher_close(merged.finalize(), whole.values, rtol=1e-5)
    # a process group of one: the all-reduce path runs and leaves the sums as they are
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        reduced = all_reduce_fisher_sums(merged)
    finally:
        dist.destroy_process_group()
    assert reduced.count == len(ids)
    assert_fisher_close(reduced.finalize(), whole.values, rtol=1e-5)


def test_save_load_round_trip(model, source, tmp_path: Path) -> None:
    dataset = CaptionedImageDataset(source, SMALLER["resolution"])
    fisher = compute_fisher(model, dataset, [1, 2, 3], "kv", batch_size=8, seed=9, progress=False)
    path = fisher.save(tmp_path / "fisher" / "kv.safetensors")
    loaded = FisherDiagonal.load(path)
    assert loaded.names == fisher.names
    for name in fisher.names:
        assert torch.equal(loaded[name], fisher[name])
    assert loaded.metadata == fisher.metadata
    assert loaded.metadata["subset"] == "kv" and loaded.metadata["seed"] == 9
    assert json.loads(path.with_suffix(".json").read_text())["num_examples"] == 3
    assert loaded.mean() == pytest.approx(fisher.mean())
    # Written atomically (temporary file + rename): only the file and its readable header remain.
    assert sorted(p.name for p in path.parent.iterdir()) == ["kv.json", "kv.safetensors"]
    loaded.validate(select_parameters(model.unet, "kv"))
    with pytest.raises(FileNotFoundError, match="compute_fisher"):
        FisherDiagonal.load(tmp_path / "missing.safetensors")


def test_validate_rejects_bad_fishers(model) -> None:
    params = select_parameters(model.unet, "kv")
    good = {name: torch.rand_like(p) + 0.1 for name, p in params.items()}
    FisherDiagonal(good).validate(params)
    first = next(iter(good))
    nan = dict(good)
    nan[first] = good[first].clone()
    nan[first][0, 0] = float("nan")
    with pytest.raises(FisherError, match="NaN/inf.*recompute"):
        FisherDiagonal(nan).validate()
    with pytest.raises(ValueError, match="Every Fisher entry is zero.*weight subset"):
        FisherDiagonal({n: torch.zeros_like(v) for n, v in good.items()}).validate()
    with pytest.raises(ValueError, match="lacks 1 of the selected weights.*same weight subset"):
        FisherDiagonal({n: v for n, v in good.items() if n != first}).validate(params)
    with pytest.raises(ValueError, match="negative"):
        FisherDiagonal({n: -v for n, v in good.items()}).validate()
    with pytest.raises(ValueError, match="empty"):
        FisherDiagonal({}).validate()


def test_bad_arguments(model, source) -> None:
    dataset = CaptionedImageDataset(source, SMALLER["resolution"])
    with pytest.raises(ValueError, match="Unknown weight subset 'keys'"):
        compute_fisher(model, dataset, [0], "keys", progress=False)
    with pytest.raises(ValueError, match="non-empty list of ids"):
        compute_fisher(model, dataset, [], "kv", progress=False)
    with pytest.raises(ValueError, match="Unknown Fisher method"):
        compute_fisher(model, dataset, [0], "kv", method="jvp", progress=False)
