"""The deterministic per-sample loss: keyed noise, independent of batch size and order."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from small_models import small_model, small_world

from diffusion_attribution.attribution.unlearning.scores import reduce_flips, unlearning_scores
from diffusion_attribution.compute.input_cache import encode_inputs
from diffusion_attribution.data.base import CaptionedImageDataset, CaptionedImageSource
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.objective.sweep import SweepEngine, per_sample_losses
from diffusion_attribution.utils.seeding import counter_randn, keyed_randn

TIMESTEPS = [0, 250, 500, 999]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[TextToImageModel, CaptionedImageDataset]:
    data = small_world(tmp_path_factory.mktemp("shapes"))
    dataset = data.full_dataset()
    return small_model(dataset.source.all_captions()), dataset


def test_independent_of_batch_size_and_order(world) -> None:
    model, dataset = world
    ids = list(range(0, 40, 4))
    args = {"timesteps": TIMESTEPS, "caption_indices": [0, 2], "flips": (False, True), "seed": 3}
    small = per_sample_losses(model, dataset, ids, batch_size=3, **args)
    large = per_sample_losses(model, dataset, ids, batch_size=16, **args)
    assert small.shape == (len(ids), 2, 2)
    assert torch.isfinite(small).all()
    torch.testing.assert_close(small, large, rtol=0, atol=1e-6)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))
    shuffled = per_sample_losses(model, dataset, [ids[i] for i in order], batch_size=7, **args)
    torch.testing.assert_close(shuffled, small[order], rtol=0, atol=1e-6)
    # a different seed is different noise
    other = per_sample_losses(model, dataset, ids, batch_size=16, **{**args, "seed": 4})
    assert not torch.allclose(other, small)


@pytest.mark.parametrize("kind", ["counter", "generator"])
def test_matches_a_direct_computation(world, kind: str) -> None:
    model, dataset = world
    example_id, caption_index, flip = 5, 1, True
    losses = per_sample_losses(
        model, dataset, [example_id], TIMESTEPS, [caption_index], [flip], 11, 64, noise=kind
    )
    example = dataset.example(example_id, caption_index, flip)
    latents = model.encode_images(example["pixel_values"][None])
    expected = []
    with torch.no_grad():
        for t in TIMESTEPS:
            keys = (11, example_id, caption_index, t, 1)
            noise = (
                keyed_randn(model.latent_shape, *keys)[None]
                if kind == "generator"
                else counter_randn(torch.tensor([keys]), model.latent_shape)
            )
            timestep = torch.tensor([t])
            prediction = model.predict(
                model.add_noise(latents, noise, timestep), timestep, model.encode_text([example["caption"]])
            )
            target = model.target(latents, noise, timestep)
            expected.append(((prediction - target) ** 2).mean())
    torch.testing.assert_close(losses[0, 0, 0], torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)


class UnevenCaptions(CaptionedImageSource):
    """Three grey images with 1, 3 and 2 captions."""

    texts = [["a dark square"], ["a mid square", "grey", "a grey square"], ["a light square", "light"]]

    def __len__(self) -> int:
        return len(self.texts)

    def captions(self, idx: int) -> list[str]:
        return self.texts[idx]

    def load_image(self, idx: int) -> Image.Image:
        return Image.new("RGB", (16, 16), (60 + 60 * idx,) * 3)

    def file_name(self, idx: int) -> str:
        return f"{idx}.png"


def test_missing_captions_are_nan_and_skipped_by_scores() -> None:
    source = UnevenCaptions()
    model = small_model(source.all_captions())
    dataset = CaptionedImageDataset(source, resolution=16)
    losses = per_sample_losses(model, dataset, [0, 1, 2], [100, 900], None, (False,), 0, 4)
    assert losses.shape == (3, 3, 1)
    has = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    assert torch.isfinite(losses[..., 0][has]).all()
    assert torch.isnan(losses[..., 0][~has]).all()
    explicit = per_sample_losses(model, dataset, [1, 2], [100, 900], [1], (False,), 0, 4)
    torch.testing.assert_close(explicit[:, 0], losses[1:, 1], equal_nan=True, rtol=0, atol=1e-6)
    scores = unlearning_scores(losses, losses + 1.0)
    torch.testing.assert_close(scores, torch.ones(3))


def test_scores_average_captions_then_take_the_max_over_flips() -> None:
    before = torch.zeros(2, 2, 2)
    after = torch.tensor([[[1.0, 4.0], [3.0, 0.0]], [[2.0, 2.0], [float("nan"), float("nan")]]])
    # example 0: caption means per flip (2, 2) -> max 2; example 1: only caption 0 -> (2, 2) -> 2
    torch.testing.assert_close(unlearning_scores(before, after), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(unlearning_scores(before, after, "min"), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(reduce_flips(after[0]), torch.tensor([4.0, 3.0]))
    torch.testing.assert_close(reduce_flips(after[0], "mean"), torch.tensor([2.5, 1.5]))
    with pytest.raises(ValueError, match="flip reduction"):
        reduce_flips(after, "median")
    with pytest.raises(ValueError, match="differ in shape"):
        unlearning_scores(before, after[:1])


def test_log_ratio_scores_the_relative_rise() -> None:
    before = torch.tensor([[[0.01], [0.02]], [[1.0], [float("nan")]], [[0.5], [0.5]]])
    after = torch.tensor([[[0.02], [0.04]], [[1.5], [float("nan")]], [[0.0], [0.5]]])
    scores = unlearning_scores(before, after, score="log_ratio")
    # example 0 doubles (log 2) from a small loss; example 1 rises 50% (caption 1 missing); example 2's
    # loss falls to exactly 0 on one caption: finite, and lowest
    assert scores[0] == pytest.approx(math.log(2.0), rel=1e-6)
    assert scores[1] == pytest.approx(math.log(1.5), rel=1e-6)
    assert torch.isfinite(scores).all() and scores.argmin() == 2
    difference = unlearning_scores(before, after)
    assert difference[1] > difference[0]  # the absolute change ranks them the other way round
    with pytest.raises(ValueError, match="Unknown unlearning score 'ratio'.*log_ratio"):
        unlearning_scores(before, after, score="ratio")


def test_bad_inputs(world) -> None:
    model, dataset = world
    with pytest.raises(ValueError, match="outside the model's range"):
        per_sample_losses(model, dataset, [0], [1000])
    with pytest.raises(ValueError, match="at least one timestep"):
        per_sample_losses(model, dataset, [0], [])
    with pytest.raises(ValueError, match="batch_size"):
        per_sample_losses(model, dataset, [0], [0], batch_size=0)
    with pytest.raises(ValueError, match="noise='philox'.*counter"):
        per_sample_losses(model, dataset, [0], [0], noise="philox")
    with pytest.raises(ValueError, match="precision='fp16'.*bf16"):
        per_sample_losses(model, dataset, [0], [0], precision="fp16")


def _cached(model, dataset, ids, flips, captions):
    from diffusion_attribution.compute.input_cache import SweepInputs

    encoded = encode_inputs(model, dataset, ids, flips, captions, batch_size=5)
    return SweepInputs(
        torch.tensor(sorted(ids)), tuple(flips), tuple(captions), encoded["inputs"], encoded["text_states"]
    )


def test_the_input_cache_gives_the_same_losses(world) -> None:
    model, dataset = world
    ids = list(range(0, 40, 3))
    args = {
        "timesteps": TIMESTEPS,
        "caption_indices": [2, 0],
        "flips": (False, True),
        "seed": 3,
        "batch_size": 16,
    }
    plain = per_sample_losses(model, dataset, ids, **args)
    # the cache covers more ids, flips and captions than asked for, in another order
    inputs = _cached(model, dataset, list(range(40)), [True, False], [0, 1, 2])
    cached = per_sample_losses(model, dataset, ids[::-1], inputs=inputs, **args).flip(0)
    torch.testing.assert_close(cached, plain, rtol=1e-6, atol=1e-7)
    with pytest.raises(KeyError, match="no inputs for ids"):
        per_sample_losses(model, dataset, [41], inputs=inputs, **args)
    with pytest.raises(KeyError, match="caption indices"):
        per_sample_losses(
            model, dataset, ids, inputs=_cached(model, dataset, ids, [False, True], [0]), **args
        )


def test_bf16_and_channels_last_stay_close_to_fp32(world) -> None:
    model, dataset = world
    ids = list(range(0, 40, 2))
    args = {"timesteps": TIMESTEPS, "caption_indices": [0], "seed": 1, "batch_size": 16}
    fp32 = per_sample_losses(model, dataset, ids, **args)
    channels_last = per_sample_losses(model, dataset, ids, engine=SweepEngine(channels_last=True), **args)
    torch.testing.assert_close(channels_last, fp32, rtol=1e-4, atol=1e-6)
    assert model.unet.conv_in.weight.is_contiguous()  # the memory format is put back
    bf16 = per_sample_losses(model, dataset, ids, precision="bf16", **args)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert not torch.equal(bf16, fp32)
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=1e-3)


def test_attention_kernels_give_the_same_losses_and_a_missing_one_is_named(world) -> None:
    model, dataset = world
    ids = list(range(0, 40, 5))
    args = {"timesteps": TIMESTEPS, "caption_indices": [0], "seed": 2, "batch_size": 8}
    default = per_sample_losses(model, dataset, ids, **args)
    for kernel in ("math", "flash"):  # the CPU's two kernels
        pinned = per_sample_losses(model, dataset, ids, engine=SweepEngine(attention=kernel), **args)
        torch.testing.assert_close(pinned, default, rtol=1e-5, atol=1e-7)
    # memory-efficient attention has no CPU kernel: the error names the setting and the way out
    with pytest.raises(ValueError, match="method.attention=efficient.*default.*math"):
        per_sample_losses(model, dataset, ids, engine=SweepEngine(attention="efficient"), **args)
    with pytest.raises(ValueError, match="attention='xformers'.*math"):
        SweepEngine(attention="xformers")


def test_the_input_cache_moves_to_the_device_only_when_it_fits(world) -> None:
    from diffusion_attribution.compute.input_cache import resident_inputs

    model, dataset = world
    inputs = _cached(model, dataset, list(range(6)), [False], [0])
    assert inputs.nbytes == inputs.inputs.nbytes + inputs.text_states.nbytes > 0
    assert resident_inputs(inputs, torch.device("cpu")) is inputs
    meta = torch.device("meta")  # stands in for an accelerator: no memory, no compute
    held = resident_inputs(inputs, meta, free_bytes=2 * inputs.nbytes)
    assert held.inputs.device == meta and held.text_states.device == meta
    assert torch.equal(held.ids, inputs.ids)
    streamed = resident_inputs(inputs, meta, free_bytes=2 * inputs.nbytes - 1)  # over half the free memory
    assert streamed is inputs and streamed.inputs.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on GPU machines)")
def test_the_engine_on_cuda_gives_the_cpu_losses(world) -> None:
    import copy

    from diffusion_attribution.compute.input_cache import resident_inputs

    model, dataset = world
    ids = list(range(0, 40, 4))
    args = {"timesteps": TIMESTEPS, "caption_indices": [0, 1], "flips": (False, True), "seed": 5}
    on_cpu = per_sample_losses(model, dataset, ids, noise="counter", **args)
    gpu = copy.deepcopy(model).to("cuda")
    inputs = resident_inputs(_cached(gpu, dataset, ids, [False, True], [0, 1]), gpu.device)
    assert inputs.inputs.device.type == "cuda"  # a few kB: held on the device
    on_cuda = per_sample_losses(gpu, dataset, ids, noise="counter", inputs=inputs, batch_size=7, **args)
    torch.testing.assert_close(on_cuda, on_cpu, rtol=2e-3, atol=1e-5)  # TF32 convolutions on CUDA


def test_a_bfloat16_input_cache_rounds_only_the_inputs(world) -> None:
    from diffusion_attribution.compute.input_cache import SweepInputs

    model, dataset = world
    ids = list(range(0, 40, 4))
    args = {"timesteps": TIMESTEPS, "caption_indices": [0], "seed": 4, "batch_size": 16}
    full = per_sample_losses(model, dataset, ids, **args)
    encoded = encode_inputs(model, dataset, ids, [False], [0], batch_size=8, dtype=torch.bfloat16)
    assert encoded["inputs"].dtype == encoded["text_states"].dtype == torch.bfloat16
    inputs = SweepInputs(torch.tensor(ids), (False,), (0,), encoded["inputs"], encoded["text_states"])
    rounded = per_sample_losses(model, dataset, ids, inputs=inputs, **args)
    assert rounded.dtype == torch.float32 and not torch.equal(rounded, full)
    torch.testing.assert_close(rounded, full, rtol=0.02, atol=1e-4)
