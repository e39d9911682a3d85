"""The TRAK kernel: score(q, z) = φ(q)ᵀ (ΦᵀΦ + λI)⁻¹ φ(z), solved through the Cholesky factor of the
smaller of two forms that give the same scores: ΦᵀΦ + λI (k x k, paper scale) or, when k exceeds the
number of training examples, ΦΦᵀ + λI (N x N, with the Woodbury identity)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


# ------------------------------------------------------------------------------------- kernel
def gram_factor(features: Iterable[torch.Tensor], dim: int, damping: float) -> torch.Tensor:
    """Lower Cholesky factor L (float64) of ΦᵀΦ + λI, Φ given as row blocks [n_i, dim]."""
    if damping <= 0:
        raise ValueError(f"damping (λ) must be positive, got {damping}: ΦᵀΦ alone is singular when k > N.")
    gram: torch.Tensor | None = None
    for block in features:
        block = block.to(torch.float64)
        part = block.T @ block
        gram = part if gram is None else gram + part
    if gram is None:
        raise ValueError("No training features for the kernel: the model's training set is empty.")
    gram.diagonal().add_(float(damping))
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        raise FloatingPointError(
            f"ΦᵀΦ + λI is not positive definite (Cholesky failed at column {int(info)}; λ = {damping}): the "
            "features contain NaN/inf or λ is too small for float64. Raise method.damping."
        )
    return factor


def kernel_solve(factor: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(ΦᵀΦ + λI)⁻¹ v for each row v of `vectors` [Q, k], given the Cholesky factor: [Q, k]."""
    return torch.cholesky_solve(vectors.to(factor.dtype).T, factor).T


def example_gram_factor(features: torch.Tensor, damping: float) -> torch.Tensor:
    """Lower Cholesky factor (float64) of ΦΦᵀ + λI for Φ [N, k]: the N x N form, smaller when N < k."""
    if damping <= 0:
        raise ValueError(f"damping (λ) must be positive, got {damping}.")
    phi = features.to(torch.float64)
    gram = phi @ phi.T
    gram.diagonal().add_(float(damping))
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        raise FloatingPointError(
            f"ΦΦᵀ + λI is not positive definite (λ = {damping}): the features contain NaN/inf. Recompute the store."
        )
    return factor


def woodbury_solve(
    factor: torch.Tensor, features: torch.Tensor, vectors: torch.Tensor, damping: float
) -> torch.Tensor:
    """(ΦᵀΦ + λI)⁻¹ v = (v − Φᵀ(ΦΦᵀ + λI)⁻¹Φ v) / λ for each row v of `vectors` [Q, k], given the
    factor of ΦΦᵀ + λI (`example_gram_factor`) and Φ [N, k]: [Q, k], equal to `kernel_solve`."""
    phi = features.to(factor)
    v = vectors.to(factor).T  # [k, Q]
    return ((v - phi.T @ torch.cholesky_solve(phi @ v, factor)) / float(damping)).T
