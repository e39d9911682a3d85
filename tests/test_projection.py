"""The blockwise random projection (modules/projection.py): it preserves inner products as the
Johnson–Lindenstrauss lemma says, is the product with one fixed matrix whatever the batch, and
refuses impossible dimensions."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_attribution.autograd.projection import BlockwiseProjection, ProjectionError

SHAPES = {"down.attn2.to_k.weight": (24, 40), "down.attn2.to_v.weight": (24, 40), "mid.bias": (37,)}
NUM_INPUTS = 24 * 40 * 2 + 37


def random_gradients(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn((batch, *shape), generator=generator) for name, shape in SHAPES.items()}


def flat(gradients: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(g.shape[0], -1) for g in gradients.values()], dim=1).double()


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_inner_products_are_preserved_within_the_jl_tolerance(kind: str) -> None:
    dim = 512
    projection = BlockwiseProjection(SHAPES, dim, seed=3, kind=kind, block_rows=100)
    # Correlated vectors (a shared component), so that the inner products are not all near zero.
    gradients = random_gradients(40)
    common = random_gradients(1, seed=1)
    gradients = {n: g + 0.7 * common[n] for n, g in gradients.items()}
    x = flat(gradients)
    px = projection.project(gradients)
    exact, projected = x @ x.T, px @ px.T
    norms = x.norm(dim=1)
    # Relative to |a||b|, a projected inner product errs with standard deviation sqrt((1 + cos²)/k).
    cos = exact / torch.outer(norms, norms)
    sigma = torch.sqrt((1 + cos**2) / dim)
    z = (projected - exact) / torch.outer(norms, norms) / sigma
    off_diagonal = z[~torch.eye(len(x), dtype=torch.bool)]
    assert float(z.abs().max()) < 5.0
    assert 0.6 < float(off_diagonal.pow(2).mean()) < 1.6  # the errors have the predicted size
    squared_norm_ratio = projected.diagonal() / exact.diagonal()
    assert abs(float(squared_norm_ratio.mean()) - 1) < 3 * math.sqrt(2 / dim) / math.sqrt(len(x))


def test_projection_is_one_fixed_matrix_whatever_the_chunking() -> None:
    projection = BlockwiseProjection(SHAPES, 64, seed=0, block_rows=128)
    gradients = random_gradients(11)
    together = projection.project(gradients).float()
    for chunk in (1, 3, 7):
        parts = [
            projection.project({n: g[i : i + chunk] for n, g in gradients.items()})
            for i in range(0, 11, chunk)
        ]
        assert torch.equal(torch.cat(parts).float(), together)
    # The product with the materialised matrix (rows in parameter order, blocks in order).
    matrix = projection.matrix()
    assert matrix.shape == (NUM_INPUTS, 64)
    torch.testing.assert_close(
        projection.project(gradients), flat(gradients) @ matrix, rtol=1e-10, atol=1e-10
    )
    # Made again from the seed: the same numbers; another seed or block size: other numbers.
    assert torch.equal(BlockwiseProjection(SHAPES, 64, seed=0, block_rows=128).matrix(), matrix)
    assert not torch.equal(BlockwiseProjection(SHAPES, 64, seed=1, block_rows=128).matrix(), matrix)
    assert not torch.equal(BlockwiseProjection(SHAPES, 64, seed=0, block_rows=100).matrix(), matrix)


def test_blocks_are_keyed_by_parameter_name() -> None:
    """A parameter's rows do not depend on which other parameters are projected with it."""
    both = BlockwiseProjection(SHAPES, 32, seed=5, block_rows=50)
    alone = BlockwiseProjection({"mid.bias": SHAPES["mid.bias"]}, 32, seed=5, block_rows=50)
    assert torch.equal(both.matrix()[-37:], alone.matrix())
    assert not torch.equal(both.block("down.attn2.to_k.weight", 0), both.block("down.attn2.to_v.weight", 0))


def test_entries_are_scaled_gaussian_or_signs() -> None:
    gaussian = BlockwiseProjection(SHAPES, 256, kind="gaussian").matrix()
    signs = BlockwiseProjection(SHAPES, 256, kind="rademacher").matrix()
    assert torch.equal(signs.abs(), torch.full_like(signs, 1 / 16))
    assert abs(float(gaussian.pow(2).mean()) * 256 - 1) < 0.01


def test_impossible_projections_are_refused() -> None:
    with pytest.raises(
        ProjectionError, match=rf"dimension {NUM_INPUTS + 1} is out of range for 1,957 weights"
    ):
        BlockwiseProjection(SHAPES, NUM_INPUTS + 1)
    BlockwiseProjection(SHAPES, NUM_INPUTS)  # k = d is allowed
    with pytest.raises(ProjectionError, match="Unknown projection kind 'sparse'"):
        BlockwiseProjection(SHAPES, 8, kind="sparse")
    projection = BlockwiseProjection(SHAPES, 8)
    gradients = random_gradients(2)
    del gradients["mid.bias"]
    with pytest.raises(ProjectionError, match="missing 1 projected parameters"):
        projection.project(gradients)
