"""Generators seeded by a tuple of integers (base seed, example id, caption index, timestep, flip, ...).

Every random draw that enters a per-example quantity (the noise of a per-sample loss, the timestep of a
Fisher sample) comes from a generator keyed by *what* is being computed, never by *when*: results then do
not depend on batch size, batch order, device count or sharding.
"""

from __future__ import annotations

import hashlib

import torch


def seed_from_keys(*keys: int) -> int:
    """A 63-bit seed from integer keys (stable across runs, platforms and Python versions)."""
    text = ",".join(str(int(k)) for k in keys)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def keyed_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from the keys. Draw on CPU and move: CUDA streams differ per device."""
    return torch.Generator().manual_seed(seed_from_keys(*keys))


def keyed_randn(shape: tuple[int, ...] | torch.Size, *keys: int) -> torch.Tensor:
    """Standard normal noise of `shape` that depends only on the keys."""
    return torch.randn(tuple(shape), generator=keyed_generator(*keys))
