"""EK-FAC (AbU+): factors and eigenvalues against brute force, the preconditioned step against the
dense matrix it stands for, reduction to the diagonal Fisher, shards, files, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from small_models import SMALLER, small_model, small_world

from diffusion_attribution.attribution.unlearning.attributor import UnlearningAttributor
from diffusion_attribution.attribution.unlearning.step import (
    preserved_parameters,
    query_loss_gradient,
    unlearn,
)
from diffusion_attribution.autograd.per_sample import per_sample_gradients
from diffusion_attribution.curvature.base import FisherError
from diffusion_attribution.curvature.diagonal import compute_fisher
from diffusion_attribution.curvature.ekfac import (
    EKFAC,
    EKFACCurvature,
    accumulate_eigenvalues,
    accumulate_factors,
    compute_ekfac,
    linear_blocks,
    run_ekfac,
)
from diffusion_attribution.data.base import CaptionedImageDataset
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.models.weight_subsets import select_parameters
from diffusion_attribution.objective.batches import training_loss_batches

IDS = [0, 3, 7, 12, 21, 30]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory):
    data = small_world(tmp_path_factory.mktemp("shapes"))
    return data.source


@pytest.fixture(scope="module")
def model(source) -> TextToImageModel:
    return small_model(source.all_captions())


@pytest.fixture(scope="module")
def dataset(source) -> CaptionedImageDataset:
    return CaptionedImageDataset(source, SMALLER["resolution"], random_flip=True)


def brute_force_gradients(
    model: TextToImageModel, dataset: CaptionedImageDataset, params: dict, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Per-sample gradients [n, *shape] by torch.func (no hooks), with the Fisher's draws."""
    work = [(i, 0) for i in IDS]
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for _, noisy, t, text, target in training_loss_batches(model, dataset, work, 4, seed, True):
        grads = per_sample_gradients(model.unet, params, noisy, t, text, target, method="loop")
        for name, value in grads.items():
            rows[name].append(value.double())
    return {name: torch.cat(value) for name, value in rows.items()}


def block_matrix(grads: dict[str, torch.Tensor], block) -> torch.Tensor:
    weight = grads[block.weight]
    if block.bias is None:
        return weight
    return torch.cat([weight, grads[block.bias][..., None]], dim=-1)


@pytest.mark.parametrize("subset", ["kv", "cross_attn"])
def test_eigenvalues_equal_brute_force(model, dataset, subset: str) -> None:
    """Λ = mean over samples of the squared per-sample gradient rotated into (Q_G, Q_A); and Q_A, Q_G
    are orthonormal eigenbases of the token second moments (checked via the per-sample gradients'
    rotated covariance being what the file says)."""
    ekfac = compute_ekfac(model, dataset, IDS, subset, batch_size=4, seed=0, progress=False)
    params = select_parameters(model.unet, subset)
    grads = brute_force_gradients(model, dataset, params)
    blocks = linear_blocks(model.unet, params)
    assert set(ekfac.blocks) == set(blocks)
    if subset == "cross_attn":  # to_out.0 has a bias: it joins its weight as an extra column
        assert any(b.bias is not None for b in blocks.values())
    for module, block in blocks.items():
        q_in, q_out = ekfac.q_in[module], ekfac.q_out[module]
        eye_in, eye_out = (
            torch.eye(q_in.shape[0], dtype=q_in.dtype),
            torch.eye(q_out.shape[0], dtype=q_out.dtype),
        )
        torch.testing.assert_close(q_in.T @ q_in, eye_in)
        torch.testing.assert_close(q_out.T @ q_out, eye_out)
        rotated = q_out.T @ block_matrix(grads, block) @ q_in
        expected = rotated.pow(2).mean(0)
        torch.testing.assert_close(
            ekfac.eigenvalues[module], expected, rtol=1e-4, atol=1e-5 * float(expected.max())
        )
    assert ekfac.metadata["num_examples"] == len(IDS)


def test_factors_are_token_second_moments(model, dataset) -> None:
    """A = Σ a aᵀ over the inputs of to_k (the text states), checked by hand for one batch."""
    params = select_parameters(model.unet, "kv")
    sums = accumulate_factors(model, dataset, IDS[:2], params, batch_size=2, progress=False)
    _, noisy, t, text, target = next(
        training_loss_batches(model, dataset, [(i, 0) for i in IDS[:2]], 2, 0, True)
    )
    module = next(m for m in linear_blocks(model.unet, params) if m.endswith("to_k"))
    states = text.double().flatten(0, 1)  # to_k reads the text states, once per forward
    torch.testing.assert_close(sums[f"A.{module}"], states.T @ states)
    assert float(sums["count"]) == 2


def test_identity_bases_give_the_diagonal_fisher(model, dataset) -> None:
    """With Q_A = Q_G = I the corrected eigenvalues are the diagonal Fisher (same draws), and the
    EK-FAC step is the diagonal one."""
    params = select_parameters(model.unet, "kv")
    blocks = linear_blocks(model.unet, params)
    bases = {
        m: (
            torch.eye(params[b.weight].shape[1], dtype=torch.float64),
            torch.eye(params[b.weight].shape[0], dtype=torch.float64),
        )
        for m, b in blocks.items()
    }
    sums = accumulate_eigenvalues(model, dataset, IDS, params, bases, batch_size=4, progress=False)
    fisher = compute_fisher(model, dataset, IDS, "kv", batch_size=4, progress=False)
    for module, block in blocks.items():
        value = sums[f"L.{module}"] / float(sums["count"])
        torch.testing.assert_close(
            value.float(), fisher[block.weight], rtol=1e-4, atol=1e-4 * float(value.max())
        )
    identity = EKFAC(
        blocks,
        {m: q[0] for m, q in bases.items()},
        {m: q[1] for m, q in bases.items()},
        {m: fisher[b.weight].double() for m, b in blocks.items()},
        {"num_examples": len(IDS)},
    )
    gradient = {
        n: torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) for n, p in params.items()
    }
    lam = 0.1 * fisher.mean()
    stepped = identity.precondition(gradient, 50, 0.1)
    for name in params:
        torch.testing.assert_close(
            stepped[name], gradient[name] / (50 * (fisher[name] + lam)), rtol=1e-5, atol=0
        )


def test_precondition_is_the_dense_inverse(model, dataset) -> None:
    """The step solves (N (Q Λ Qᵀ + λ I)) vec(ΔW) = vec(∇), with Q = Q_G ⊗ Q_A, the dense Fisher the
    factors stand for (a bias included as the last input column)."""
    ekfac = compute_ekfac(model, dataset, IDS, "cross_attn", batch_size=4, progress=False)
    params = select_parameters(model.unet, "cross_attn")
    generator = torch.Generator().manual_seed(4)
    gradient = {n: torch.randn(p.shape, generator=generator) for n, p in params.items()}
    n, damping = 37.0, 0.2
    lam = damping * ekfac.mean()
    stepped = ekfac.precondition(gradient, n, damping)
    for module, block in ekfac.blocks.items():
        q = torch.kron(ekfac.q_out[module], ekfac.q_in[module])  # row-major vec(W) = (Q_G ⊗ Q_A) vec(R)
        dense = n * (q @ torch.diag(ekfac.eigenvalues[module].flatten() + lam) @ q.T)
        step = block_matrix({k: v.double() for k, v in stepped.items()}, block).flatten()
        expected = block_matrix({k: v.double() for k, v in gradient.items()}, block).flatten()
        torch.testing.assert_close(dense @ step, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_sharded_run_equals_one_process_and_resumes(model, dataset, tmp_path: Path) -> None:
    ids = list(range(10))
    whole = compute_ekfac(model, dataset, ids, "kv", batch_size=16, progress=False)
    identity = {"model": "m", "data": "d"}
    sharded = run_ekfac(model, dataset, ids, "kv", tmp_path / "ekfac", identity, batch_size=3, shard_size=4)
    for module in whole.blocks:
        # eigenvectors are defined up to sign: compare what they define, the eigenvalues and the step
        torch.testing.assert_close(
            sharded.eigenvalues[module], whole.eigenvalues[module], rtol=1e-6, atol=1e-9
        )
    params = select_parameters(model.unet, "kv")
    gradient = {
        n: torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) for n, p in params.items()
    }
    a, b = whole.precondition(gradient, 10, 0.1), sharded.precondition(gradient, 10, 0.1)
    for name in params:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4 * float(a[name].abs().max()))
    # a second run finds every shard and computes nothing
    shards = sorted((tmp_path / "ekfac").rglob("shard_*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    again = run_ekfac(model, dataset, ids, "kv", tmp_path / "ekfac", identity, batch_size=3, shard_size=4)
    assert [p.stat().st_mtime_ns for p in shards] == stamps
    for module in whole.blocks:
        assert torch.equal(again.eigenvalues[module], sharded.eigenvalues[module])
    with pytest.raises(ValueError, match="different run"):
        run_ekfac(model, dataset, ids, "kv", tmp_path / "ekfac", {"model": "other"}, shard_size=4)


def test_save_load_and_validate(model, dataset, tmp_path: Path) -> None:
    ekfac = compute_ekfac(model, dataset, IDS, "cross_attn", batch_size=8, progress=False)
    loaded = EKFAC.load(ekfac.save(tmp_path / "ekfac.safetensors"))
    assert loaded.blocks == ekfac.blocks and loaded.metadata == ekfac.metadata
    # Written atomically (temporary file + rename): only the file and its readable header remain.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ekfac.json", "ekfac.safetensors"]
    for module in ekfac.blocks:
        assert torch.equal(loaded.eigenvalues[module], ekfac.eigenvalues[module])
        assert torch.equal(loaded.q_in[module], ekfac.q_in[module])
    loaded.validate(select_parameters(model.unet, "cross_attn"))
    with pytest.raises(FisherError, match="other weights"):
        loaded.validate(select_parameters(model.unet, "kv"))
    module = next(iter(loaded.blocks))
    loaded.eigenvalues[module][0, 0] = float("nan")
    with pytest.raises(FisherError, match="NaN"):
        loaded.validate()
    with pytest.raises(FileNotFoundError, match="compute_ekfac"):
        EKFAC.load(tmp_path / "missing.safetensors")


def test_unlearning_with_ekfac(model, dataset) -> None:
    """The EK-FAC curvature moves θ by α times the preconditioned gradient and raises the query's loss."""
    params = select_parameters(model.unet, "kv")
    ekfac = compute_ekfac(model, dataset, IDS, "kv", batch_size=8, progress=False)
    query = dataset.example(IDS[0], 0)
    before = {n: p.detach().clone() for n, p in params.items()}
    gradient = query_loss_gradient(model, query["pixel_values"], query["caption"], params, 16, 0)
    expected = ekfac.precondition(gradient, len(IDS), 0.1)
    curvature = EKFACCurvature.from_factors(ekfac, damping=0.1)
    with preserved_parameters(params):
        record = unlearn(model, query["pixel_values"], query["caption"], curvature, params, 1, 1e-3, 16, None)
        for name, p in params.items():
            torch.testing.assert_close(p.detach(), before[name] + 1e-3 * expected[name], rtol=1e-5, atol=1e-7)
    assert record.curvature == "ekfac" and record.num_train == len(IDS) and record.damping == 0.1
    assert record.loss_after > record.loss_before
    with pytest.raises(ValueError, match="ekfac curvature has not been fitted"):
        unlearn(model, query["pixel_values"], query["caption"], EKFACCurvature(), params)
    with pytest.raises(ValueError, match="computed for other weights"):
        wrong = select_parameters(model.unet, "cross_attn")
        unlearn(model, query["pixel_values"], query["caption"], curvature, wrong, num_train=10)


def test_non_linear_subsets_are_refused(model) -> None:
    with pytest.raises(ValueError, match="Linear layers only"):
        linear_blocks(model.unet, select_parameters(model.unet, "all"))
    with pytest.raises(ValueError, match="method.params=all"):
        UnlearningAttributor(EKFACCurvature(), params="all")
