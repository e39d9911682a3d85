"""TRAK, D-TRAK and JourneyTRAK (methods/trak.py): scores equal a brute-force implementation (plain
autograd one example at a time, the projection matrix materialised, an explicit inverse), do not
depend on the batch size, a killed train side resumes, JourneyTRAK differentiates the query's own
trajectory, bad input fails clearly, and attribute.py writes the score files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from PIL import Image
from small_models import SMALLER, small_model
from test_attribute_job import (  # noqa: F401  (pytest fixtures)
    NUM_EXAMPLES,
    PROMPT,
    attribute_cfg,
    checkpoint,
    datamodule,
    world_overrides,
    write_training_images,
)

from diffusion_attribution.attribution.base import AttributionContext
from diffusion_attribution.attribution.queries import Query, QueryError
from diffusion_attribution.attribution.trak import attributor as trak_module
from diffusion_attribution.attribution.trak.attributor import (
    DTRAKAttributor,
    JourneyTRAKAttributor,
    TRAKAttributor,
    kernel_damping,
)
from diffusion_attribution.attribution.trak.kernel import (
    example_gram_factor,
    gram_factor,
    kernel_solve,
    woodbury_solve,
)
from diffusion_attribution.attribution.trak.store import TrainSideMismatchError
from diffusion_attribution.autograd.output_gradients import per_sample_output_gradients
from diffusion_attribution.autograd.projection import BlockwiseProjection, ProjectionError
from diffusion_attribution.data.shapes import ShapesDataModule
from diffusion_attribution.jobs.attribute import run_attribution
from diffusion_attribution.models.sampling import generate, sampler_timesteps
from diffusion_attribution.models.weight_subsets import select_parameters
from diffusion_attribution.objective.loss import per_example_loss
from diffusion_attribution.utils.seeding import Stream, keyed_randn

SINGLE = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}
EXCLUDED = [3, 9, 14]
# Small but not trivial: two timesteps, two captions, both flips, a projection of 96 of 2,048 weights.
SETTINGS = {
    "projection_dim": 96,
    "block_rows": 300,
    "damping": 1e-4,
    "timesteps": [150, 700],
    "captions": 2,
    "flips": [False, True],
    "batch_size": 16,
    "shard_size": 6,
}
QUERY_PROMPT = "a striped red square on a gray background"
QUERY_STEPS = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(model, datamodule with some ids excluded from training, a generated query)."""
    data = ShapesDataModule(
        num_common=8,
        images_per_rare_concept=1,
        cache_dir=str(tmp_path_factory.mktemp("shapes")),
        resolution=SMALLER["resolution"],
        exclude=EXCLUDED,
    )
    model = small_model(data.source.all_captions()).eval()
    samples = generate(model, [QUERY_PROMPT], [2], num_steps=QUERY_STEPS)
    source = {
        "prompt": QUERY_PROMPT,
        "seed": 2,
        "sampler": "ddim",
        "num_steps": QUERY_STEPS,
        "guidance_scale": 3.0,
    }
    query = Query(QUERY_PROMPT, samples.images[0], samples.latents[0], None, source)
    return model, data, query


def context(root: Path) -> AttributionContext:
    return AttributionContext(root / "cache", root / "run", SINGLE, seed=0)


def prepared(cls, world, root: Path, **overrides):
    model, data, _ = world
    attributor = cls(**{**SETTINGS, **overrides})
    attributor.prepare(model, data, context(root))
    return attributor


# ------------------------------------------------------------------------------ brute force
def output_function(model, noisy, t, caption, target, output: str) -> torch.Tensor:
    prediction = model.predict(noisy[None], torch.tensor([t]), model.encode_text([caption]))
    if output == "loss":
        return per_example_loss(prediction, target[None])[0]
    return prediction.pow(2).mean()


def plain_gradient(model, params, value: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(value, list(params.values()))
    return torch.cat([g.reshape(-1) for g in grads]).double()


def brute_force_scores(
    model, data, query, output: str, dim: int, damping: float = SETTINGS["damping"], unscaled: bool = False
) -> np.ndarray:
    """One (example, caption, flip, timestep) at a time with loss.backward-style autograd; `unscaled`:
    with an N(0, 1) projector (no 1/√k), as the D-TRAK reference code, and its λ."""
    params = select_parameters(model.unet, "kv")
    dataset = data.full_dataset()
    timesteps = SETTINGS["timesteps"]
    rows = []
    for i in range(data.num_examples):
        captions = data.source.captions(i)[: SETTINGS["captions"]]
        total, count = 0, 0
        for flip in (False, True):
            x0 = dataset.example(i, 0, flip)["pixel_values"]
            for c, caption in enumerate(captions):
                for t in timesteps:
                    noise = keyed_randn(model.latent_shape, 0, Stream.TRAK, i, c, t, int(flip))
                    tt = torch.tensor([t])
                    noisy = model.add_noise(x0[None], noise[None], tt)[0]
                    target = model.target(x0[None], noise[None], tt)[0]
                    total = total + plain_gradient(
                        model, params, output_function(model, noisy, t, caption, target, output)
                    )
                    count += 1
        rows.append(total / count)
    gradients = torch.stack(rows)
    q_total = 0
    for t in timesteps:
        noise = keyed_randn(model.latent_shape, 0, Stream.TRAK_QUERY, t)
        tt = torch.tensor([t])
        noisy = model.add_noise(query.latent[None], noise[None], tt)[0]
        target = model.target(query.latent[None], noise[None], tt)[0]
        q_total = q_total + plain_gradient(
            model, params, output_function(model, noisy, t, query.caption, target, output)
        )
    q_gradient = q_total / len(timesteps)
    # The projection matrix materialised from the same generator (rows: parameters in model order).
    matrix = BlockwiseProjection(
        {n: p.shape for n, p in params.items()},
        dim,
        seed=0,
        block_rows=SETTINGS["block_rows"],
    ).matrix()
    if unscaled:
        matrix = matrix * math.sqrt(dim)
    features, q_feature = gradients @ matrix, q_gradient @ matrix
    train = features[torch.as_tensor(np.asarray(data.train_ids))]
    kernel = train.T @ train + damping * torch.eye(matrix.shape[1], dtype=torch.float64)
    return (q_feature @ torch.linalg.inv(kernel) @ features.T).numpy()


# k = 96 > 13 training examples: the N x N (Woodbury) form of the kernel; k = 10: the k x k form.
@pytest.mark.parametrize(
    "cls,output,dim,form",
    [(TRAKAttributor, "loss", 96, "examples"), (DTRAKAttributor, "output_norm", 10, "features")],
)
def test_scores_match_a_brute_force_implementation(world, tmp_path: Path, cls, output, dim, form) -> None:
    model, data, query = world
    attributor = prepared(cls, world, tmp_path, projection_dim=dim)
    assert attributor.kernel_form == form
    with torch.no_grad():
        scores = attributor.score([query])
    expected = brute_force_scores(model, data, query, output, dim)
    assert scores.shape == (1, data.num_examples) and scores.dtype == np.float32
    assert np.abs(expected).max() > 0 and np.isfinite(scores).all()
    np.testing.assert_allclose(scores[0], expected, rtol=0, atol=2e-4 * np.abs(expected).max())
    # Excluded ids are scored too (they have a column), but are not part of the kernel.
    assert len(data.train_ids) == data.num_examples - len(EXCLUDED)
    assert attributor.config()["train_output"] == output
    assert attributor.train_side_bytes() > data.num_examples * dim * 4


@pytest.mark.parametrize("output", ["loss", "output_norm"])
def test_hooked_linear_gradients_equal_vmap_and_a_plain_loop(world, output: str) -> None:
    model, _, query = world
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn((3, *model.latent_shape), generator=generator)
    target = torch.randn((3, *model.latent_shape), generator=generator)
    t = torch.tensor([10, 500, 900])
    with torch.no_grad():
        text = model.encode_text(["a red circle", QUERY_PROMPT, "a blue square"])
    params = select_parameters(model.unet, "kv")
    args = (model.unet, params, noisy, t, text, output, target)
    linear = per_sample_output_gradients(*args, method="linear")
    for method in ("vmap", "loop"):
        other = per_sample_output_gradients(*args, method=method)
        for name in params:  # float32 forward passes: equal up to rounding
            scale = float(linear[name].abs().max())
            torch.testing.assert_close(linear[name], other[name], rtol=0, atol=1e-5 * scale)
    assert all(float(v.abs().max()) > 0 for v in linear.values())
    with pytest.raises(ValueError, match="needs a subset of nn.Linear weights only"):
        per_sample_output_gradients(
            model.unet, select_parameters(model.unet, "all"), *args[2:], method="linear"
        )


def test_kernel_solve_matches_an_explicit_inverse() -> None:
    generator = torch.Generator().manual_seed(0)
    blocks = [torch.randn(n, 20, generator=generator) for n in (7, 5, 9)]
    queries = torch.randn(3, 20, generator=generator)
    factor = gram_factor(blocks, 20, damping=0.5)
    phi = torch.cat(blocks).double()
    explicit = torch.linalg.inv(phi.T @ phi + 0.5 * torch.eye(20, dtype=torch.float64))
    torch.testing.assert_close(
        kernel_solve(factor, queries), queries.double() @ explicit, rtol=1e-9, atol=1e-9
    )
    # The N x N form (used when k exceeds the number of training examples) gives the same solve.
    few = phi[:12]
    explicit = torch.linalg.inv(few.T @ few + 0.5 * torch.eye(20, dtype=torch.float64))
    woodbury = woodbury_solve(example_gram_factor(few, 0.5), few, queries, 0.5)
    torch.testing.assert_close(woodbury, queries.double() @ explicit, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="damping"):
        gram_factor(blocks, 20, damping=0.0)


def test_scores_do_not_depend_on_batch_or_shard_size(world, tmp_path: Path) -> None:
    _, _, query = world
    small = prepared(DTRAKAttributor, world, tmp_path / "a", batch_size=3, shard_size=5, buffer_mb=0.01)
    large = prepared(DTRAKAttributor, world, tmp_path / "b", batch_size=64, shard_size=16)
    assert small._ids_per_chunk() == 1  # the projection chunk is exercised too
    first, second = small.score([query]), large.score([query])
    assert np.abs(first).max() > 0
    np.testing.assert_allclose(first, second, rtol=0, atol=1e-5 * np.abs(first).max())
    # Queries scored together (projected in one pass) score as they do alone.
    _, data, _ = world
    example = data.full_dataset().example(4)
    image_query = Query(example["caption"], example["pixel_values"], example["pixel_values"], None, {})
    together = small.score([image_query, query])
    np.testing.assert_allclose(together[1], first[0], rtol=1e-6, atol=0)
    np.testing.assert_allclose(together[0], small.score([image_query])[0], rtol=1e-6, atol=0)


class Killed(RuntimeError):
    pass


def test_a_killed_train_side_resumes_where_it_stopped(world, tmp_path: Path, monkeypatch) -> None:
    _, _, query = world
    reference = prepared(TRAKAttributor, world, tmp_path / "reference").score([query])
    calls: list[int] = []
    inner = trak_module.training_gradient_means

    def dies_on_the_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Killed("killed mid-way")
        return inner(*args, **kwargs)

    monkeypatch.setattr(trak_module, "training_gradient_means", dies_on_the_third_shard)
    with pytest.raises(Killed):
        prepared(TRAKAttributor, world, tmp_path / "killed")
    store = next((tmp_path / "killed" / "cache" / "trak").iterdir())
    assert len(list(store.glob("shard_*.safetensors"))) == 2 and len(list(store.glob("features_*.npy"))) == 2
    counted = []
    monkeypatch.setattr(
        trak_module, "training_gradient_means", lambda *a, **k: counted.append(1) or inner(*a, **k)
    )
    resumed = prepared(TRAKAttributor, world, tmp_path / "killed")
    assert len(counted) == 1  # only the missing last shard
    np.testing.assert_array_equal(resumed.score([query]), reference)


# --------------------------------------------------------------------------------- JourneyTRAK
def test_journeytrak_differentiates_the_query_trajectory(world, tmp_path: Path) -> None:
    model, _, query = world
    attributor = prepared(JourneyTRAKAttributor, world, tmp_path, query_timestep=400)
    noisy, t, target, record = attributor.query_points(query, 0)
    visited = sampler_timesteps(model, QUERY_STEPS)
    nearest = min(visited, key=lambda s: abs(s - 400))
    assert t.tolist() == [nearest] == [record["trajectory_timestep"]]
    recorded = generate(model, [QUERY_PROMPT], [2], num_steps=QUERY_STEPS, record_timesteps=[nearest])
    torch.testing.assert_close(noisy, recorded.trajectory[nearest])
    # The target is the (v of the) noise that maps the final latent to x_t at t.
    alpha_bar = model.scheduler.alphas_cumprod[nearest]
    noise = (noisy - alpha_bar.sqrt() * query.latent) / (1 - alpha_bar).sqrt()
    torch.testing.assert_close(model.add_noise(query.latent[None], noise, t), noisy, atol=1e-5, rtol=0)
    torch.testing.assert_close(target, model.scheduler.get_velocity(query.latent[None], noise, t))
    scores = attributor.score([query])
    trak_scores = prepared(TRAKAttributor, world, tmp_path).score([query])  # shares the train side
    assert np.isfinite(scores).all() and not np.allclose(scores, trak_scores)


def test_journeytrak_refuses_queries_it_cannot_retrace(world, tmp_path: Path) -> None:
    _, _, query = world
    attributor = prepared(JourneyTRAKAttributor, world, tmp_path)
    image_query = Query(query.caption, query.image, query.latent, None, {"image": "q.png"})
    with pytest.raises(
        QueryError, match=r"is an image: method=journeytrak needs a query the model generated"
    ):
        attributor.score([image_query])
    other_seed = Query(query.caption, query.image, query.latent, None, {**query.source, "seed": 5})
    with pytest.raises(QueryError, match=r"regenerated .* ends .* away from its saved final latent"):
        attributor.score([other_seed])


# ------------------------------------------------------------------------------------ bad input
def test_bad_settings_are_refused(world, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Unknown method.params='everything'. Options: kv: "):
        TRAKAttributor(params="everything")
    with pytest.raises(ValueError, match=r"damping \(λ\) must be positive"):
        TRAKAttributor(damping=0)
    with pytest.raises(ProjectionError, match=r"dimension 4096 is out of range for 2,048 weights"):
        prepared(TRAKAttributor, world, tmp_path, projection_dim=4096)


def test_a_store_made_for_another_model_is_refused(world, tmp_path: Path) -> None:
    model, data, query = world
    store = tmp_path / "store"
    prepared(DTRAKAttributor, world, tmp_path, store_dir=str(store))
    changed = small_model(data.source.all_captions()).eval()
    with torch.no_grad():
        next(iter(select_parameters(changed.unet, "kv").values())).add_(0.01)
    attributor = DTRAKAttributor(**SETTINGS, store_dir=str(store))
    with pytest.raises(
        TrainSideMismatchError, match=r"holds projected gradients of other model weights.*Delete"
    ):
        attributor.prepare(changed, data, context(tmp_path))
    with pytest.raises(
        TrainSideMismatchError, match=r"other method settings \(settings that differ: \['timesteps'\]\)"
    ):
        prepared(DTRAKAttributor, world, tmp_path, store_dir=str(store), timesteps=[100])
    with pytest.raises(TrainSideMismatchError, match=r"set method.shard_size=6 to reuse"):
        prepared(DTRAKAttributor, world, tmp_path, store_dir=str(store), shard_size=8)


# ------------------------------------------------------------------------------------ end to end
FAST_DTRAK = [
    "method.projection_dim=256",
    "method.timesteps=[200,600]",
    "method.batch_size=32",
    "method.shard_size=32",
]


def test_attribute_job_writes_dtrak_scores(checkpoint, world_overrides, datamodule, tmp_path: Path) -> None:  # noqa: F811
    (image,), (caption,) = write_training_images(datamodule, [7], tmp_path / "images")
    run_dir = tmp_path / "run"
    queries = [
        f"query.prompts=['{PROMPT}']",
        "query.seeds=[3]",
        f"query.images=['{image}']",
        f"query.captions=['{caption}']",
    ]
    cfg = attribute_cfg(checkpoint, world_overrides, run_dir, "method=dtrak", *queries, *FAST_DTRAK)
    scores = run_attribution(cfg, run_dir)
    saved = np.load(run_dir / "scores.npy")
    assert saved.dtype == np.float32 and saved.shape == (2, NUM_EXAMPLES) and np.array_equal(saved, scores)
    ranking = json.loads((run_dir / "ranking.json").read_text())
    assert ranking["method"] == "dtrak" and ranking["method_config"]["projection_dim"] == 256
    assert ranking["train_side_mb"] > NUM_EXAMPLES * 256 * 4 / 2**20
    assert [len(q["top_k"]) for q in ranking["queries"]] == [5, 5]
    assert all(q["diagnostics"]["seconds"] > 0 for q in ranking["queries"])
    with Image.open(run_dir / "ranking.png") as png:
        assert png.width > png.height > 0
    # JourneyTRAK on the generated query retraces it (attribute.py generated it with this model).
    HydraConfig.instance().cfg = None
    run_dir = tmp_path / "journey"
    cfg = attribute_cfg(checkpoint, world_overrides, run_dir, "method=journeytrak", *queries[:2], *FAST_DTRAK)
    journey = run_attribution(cfg, run_dir)
    record = json.loads((run_dir / "ranking.json").read_text())["queries"][0]["diagnostics"]
    assert journey.shape == (1, NUM_EXAMPLES) and record["regenerated_max_abs_diff"] <= 1e-3
    HydraConfig.instance().cfg = None


def test_a_published_lambda_is_entered_in_its_own_units(world, tmp_path: Path) -> None:
    """method.damping_convention=unscaled_projection takes λ as the D-TRAK reference enters it (an
    unscaled projector): the scores equal that reference computation at that λ."""
    model, data, query = world
    dim, published = 10, 0.5
    attributor = prepared(
        DTRAKAttributor,
        world,
        tmp_path,
        projection_dim=dim,
        damping=published,
        damping_convention="unscaled_projection",
    )
    assert attributor.kernel_damping == pytest.approx(published / dim)
    with torch.no_grad():
        scores = attributor.score([query])
    expected = brute_force_scores(model, data, query, "output_norm", dim, damping=published, unscaled=True)
    np.testing.assert_allclose(scores[0], expected, rtol=0, atol=2e-4 * np.abs(expected).max())
    library = kernel_damping(published, "trak_library", dim, attributor.num_weights)
    assert library == pytest.approx(published * attributor.num_weights / dim)
    with pytest.raises(ValueError, match="Unknown method.damping_convention='paper'"):
        DTRAKAttributor(damping_convention="paper")


def test_the_default_lambda_is_the_configs_whether_built_by_hydra_or_in_python() -> None:
    conf = Path(__file__).resolve().parents[1] / "conf" / "method"
    for name, cls in (("trak", TRAKAttributor), ("dtrak", DTRAKAttributor)):
        assert cls().damping == float(OmegaConf.load(conf / f"{name}.yaml").damping)
