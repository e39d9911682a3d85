"""Generators seeded by a tuple of integers (base seed, example id, caption index, timestep, flip, ...).

Every random draw that enters a per-example quantity (the noise of a per-sample loss, the timestep of a
Fisher sample) comes from a generator keyed by *what* is being computed, never by *when*: results then do
not depend on batch size, batch order, device count or sharding.
"""

from __future__ import annotations

import hashlib
from enum import IntEnum

import torch


class Stream(IntEnum):
    """The registry of keyed random streams: the first key after the seed, so that no two kinds of draw
    ever share numbers. A new kind of draw takes a new member here (values are part of every cached
    result: never change one). The loss sweep's noise has no prefix (its keys are the example's own)."""

    TRAINING_ORDER = 101  # the data order of a keyed training epoch (training/keyed.py)
    TRAINING_EXAMPLE = 102  # an example's caption and flip in a keyed training epoch
    TRAINING_LOSS = 103  # an example's noise, timestep and caption dropout in a keyed training epoch
    RANDOM_SUBSET = 211  # random exclusion sets (leave-K-out baseline, LDS subsets)
    QUERY_NOISE = 301  # the fixed noise of a query's ΔL in leave-K-out
    SENSITIVITY_BANK = 401  # the training captions and sampling seeds of the sensitivity bank
    ENCODE = 3_301_977  # VAE posterior samples of encoded examples (compute/inputs.py)
    PROJECTION = 3_904_227  # the blocks of TRAK's random projection
    QUERY = 5_162_017  # the (timestep, noise) samples of an unlearned query's loss
    TRAK_QUERY = 6_517_203  # a TRAK query's noise at the train-side timesteps
    FISHER = 7_146_081  # a training example's draws for the Fisher and EK-FAC
    TRAK = 8_230_561  # a training example's noise for TRAK-style gradients


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
