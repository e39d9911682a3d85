"""The curvature interface: damping by layer or globally, checked against the dense formula on two
layers of very different scale (as cross-attention K and V are), for EK-FAC and the diagonal Fisher."""

from __future__ import annotations

import pytest
import torch

from diffusion_attribution.curvature.diagonal import DiagonalCurvature, FisherDiagonal
from diffusion_attribution.curvature.ekfac import EKFAC, EKFACCurvature, LinearBlock

N = 50.0
DAMPING = 0.1
# (out, in) shapes and the scale of each layer's eigenvalues: 1e-4 against 1.0
LAYERS = {"k": ((3, 4), 1e-4), "v": ((2, 5), 1.0)}


def random_orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64)).Q


def toy_ekfac() -> EKFAC:
    generator = torch.Generator().manual_seed(0)
    blocks, q_in, q_out, eigen = {}, {}, {}, {}
    for module, ((rows, cols), scale) in LAYERS.items():
        blocks[module] = LinearBlock(module, f"{module}.weight", None)
        q_in[module] = random_orthogonal(cols, generator)
        q_out[module] = random_orthogonal(rows, generator)
        eigen[module] = scale * (torch.rand(rows, cols, generator=generator, dtype=torch.float64) + 0.1)
    return EKFAC(blocks, q_in, q_out, eigen, {"num_examples": int(N)})


def gradients(generator_seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(generator_seed)
    return {f"{m}.weight": torch.randn(*shape, generator=generator) for m, (shape, _) in LAYERS.items()}


def dense_ekfac_step(ekfac: EKFAC, gradient: torch.Tensor, module: str, lam: float) -> torch.Tensor:
    """(N (Q Λ Qᵀ + λ I))⁻¹ vec(G) with Q = Q_G ⊗ Q_A, the layer's whole Fisher block as a dense matrix."""
    q = torch.kron(ekfac.q_out[module], ekfac.q_in[module])
    fisher = q @ torch.diag(ekfac.eigenvalues[module].reshape(-1)) @ q.T
    dense = N * (fisher + lam * torch.eye(len(fisher), dtype=torch.float64))
    return torch.linalg.solve(dense, gradient.double().reshape(-1)).reshape(gradient.shape)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_ekfac_damping_equals_the_dense_formula(scope: str) -> None:
    ekfac = toy_ekfac()
    grads = gradients()
    stepped = EKFACCurvature.from_factors(ekfac, damping=DAMPING, damping_scope=scope).precondition(grads, N)
    everything = torch.cat([v.reshape(-1) for v in ekfac.eigenvalues.values()]).mean()
    for module in LAYERS:
        own = ekfac.eigenvalues[module].mean()
        lam = DAMPING * float(own if scope == "layer" else everything)
        expected = dense_ekfac_step(ekfac, grads[f"{module}.weight"], module, lam)
        torch.testing.assert_close(stepped[f"{module}.weight"].double(), expected, rtol=1e-5, atol=0)


def test_layer_damping_keeps_a_small_layer_from_being_swamped() -> None:
    """With one global λ the small-scale layer's step is damped ~10⁴-fold relative to its own Fisher;
    per layer, each layer's step is damped by the same fraction of its own scale."""
    ekfac, grads = toy_ekfac(), gradients()
    per_layer = EKFACCurvature.from_factors(ekfac, damping=DAMPING, damping_scope="layer").precondition(
        grads, N
    )
    shared = EKFACCurvature.from_factors(ekfac, damping=DAMPING).precondition(grads, N)
    ratio = {m: float(per_layer[f"{m}.weight"].norm() / shared[f"{m}.weight"].norm()) for m in LAYERS}
    assert ratio["k"] > 100 and 0.5 < ratio["v"] < 2


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_diagonal_damping_by_layer(scope: str) -> None:
    generator = torch.Generator().manual_seed(2)
    values = {
        f"{m}.{part}": scale
        * (torch.rand(shape if part == "weight" else shape[:1], generator=generator) + 0.1)
        for m, (shape, scale) in LAYERS.items()
        for part in ("weight", "bias")
    }
    fisher = FisherDiagonal(values, {"num_examples": int(N)})
    grads = {n: torch.randn(v.shape, generator=generator) for n, v in values.items()}
    stepped = DiagonalCurvature.from_fisher(fisher, damping=DAMPING, damping_scope=scope).precondition(
        grads, N
    )
    everything = torch.cat([v.double().reshape(-1) for v in values.values()]).mean()
    for name, value in values.items():
        module = name.rpartition(".")[0]
        own = torch.cat(
            [values[f"{module}.weight"].double().reshape(-1), values[f"{module}.bias"].double()]
        ).mean()
        lam = DAMPING * float(own if scope == "layer" else everything)
        expected = grads[name].double() / (N * (value.double() + lam))
        torch.testing.assert_close(stepped[name].double(), expected, rtol=1e-5, atol=0)


def test_an_unknown_damping_scope_names_the_options() -> None:
    with pytest.raises(ValueError, match=r"damping_scope='model'.*\('global', 'layer'\)"):
        EKFACCurvature(damping_scope="model")
