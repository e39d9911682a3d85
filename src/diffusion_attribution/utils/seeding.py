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


# ----------------------------------------------------------------------- counter-based keyed noise
# Every value below is a 32-bit word held in an int64 tensor, and no product reaches 2^63: a word
# (< 2^32) times a multiplier below 2^31 directly, a larger multiplier in 16-bit halves. The integer
# results are therefore exact and the same on every device.
_MASK32 = 0xFFFFFFFF
_LANE_SEEDS = (0x243F6A88, 0x85A308D3)  # the two lanes' start values (digits of π)
# (shift, multiplier, shift, multiplier, shift) of the 32-bit finalisers: the two lanes', then the
# elements' (whose multipliers stay below 2^31, so that each costs one multiply on the large tensors).
_LANE_MIX = ((16, 0x7FEB352D, 15, 0x846CA68B, 16), (16, 0x85EBCA6B, 13, 0xC2B2AE35, 16))
_ELEMENT_MIX = (16, 0x21F0AAAD, 15, 0x735A2D97, 15)
_COUNTER_STEP = 0x9E3779B9  # the golden-ratio (Weyl) increment between element counters


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2^32 for words x and a 32-bit constant c, every intermediate below 2^63."""
    if c < 1 << 31:
        return (x * c) & _MASK32
    low, high = c & 0xFFFF, c >> 16
    return ((x * low) + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor, mix: tuple[int, int, int, int, int]) -> torch.Tensor:
    """A bijective 32-bit finaliser: xor-shift, multiply, xor-shift, multiply, xor-shift."""
    s1, m1, s2, m2, s3 = mix
    x = x ^ (x >> s1)
    x = _mul32(x, m1)
    x = x ^ (x >> s2)
    x = _mul32(x, m2)
    return x ^ (x >> s3)


def counter_randn(keys: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Standard normal noise [N, *shape] (float32, on `keys`' device) for integer keys [N, K], one row
    of keys per draw, e.g. (seed, id, caption index, timestep, flip). Row n's noise depends only on
    row n's keys: not on N, the order of the rows, or how a caller chunks them. No torch.Generator
    and no Python loop over rows: a batch's noise is one call of a few dozen tensor operations.

    The algorithm (a counter-based generator built from int64 tensor operations only):

    1. Each key is cut into two 32-bit words (low, then high; negative keys in two's complement), and
       the words are absorbed in order into two 32-bit lanes, h ← mix(h ⊕ word), each lane with its
       own start value and finaliser: a 64-bit digest (h₁, h₂) of the row. For fixed earlier words
       each absorption is a bijection, so rows that differ only in their last key never share a lane
       value; other distinct rows share both with probability about 2⁻⁶⁴.
    2. Element counter j = 0, 1, ... gives the word r_j = mix(h₁ ⊕ ((h₂ + j · 0x9E3779B9) mod 2³²))
       (a Weyl sequence started at h₂, xored with h₁ and finalised, as in SplitMix).
    3. Uniforms from the top 24 bits: u = ((r_{2p} >> 8) + 1) / 2²⁴ in (0, 1] and
       v = (r_{2p+1} >> 8) / 2²⁴ in [0, 1); Box–Muller in float32 gives elements 2p and 2p + 1 of the
       row, √(−2 ln u)·cos(2πv) and √(−2 ln u)·sin(2πv). The row is then reshaped to `shape`.

    The integers of steps 1–2 are identical on CPU and CUDA; the float32 logarithm, sine and cosine of
    step 3 may differ between devices in the last bit. Changing any constant here changes every
    result computed with this noise (tests pin a few values).
    """
    keys = torch.as_tensor(keys)
    if keys.dim() != 2 or keys.dtype != torch.int64:
        raise ValueError(
            f"keys must be an int64 tensor [N, K]; got {keys.dtype} of shape {tuple(keys.shape)}."
        )
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    rows, device = keys.shape[0], keys.device
    lanes = [torch.full((rows,), seed, dtype=torch.int64, device=device) for seed in _LANE_SEEDS]
    for column in keys.unbind(1):
        for word in (column & _MASK32, (column >> 32) & _MASK32):
            lanes = [_mix32(lane ^ word, mix) for lane, mix in zip(lanes, _LANE_MIX, strict=True)]
    pairs = (numel + 1) // 2
    weyl = _mul32(torch.arange(2 * pairs, dtype=torch.int64, device=device), _COUNTER_STEP)
    words = _mix32(((weyl + lanes[1][:, None]) & _MASK32) ^ lanes[0][:, None], _ELEMENT_MIX)
    top = (words >> 8).view(rows, pairs, 2)
    scale = 1.0 / (1 << 24)
    u = (top[..., 0] + 1).to(torch.float32).mul_(scale)
    angle = top[..., 1].to(torch.float32).mul_(2.0 * torch.pi * scale)
    radius = u.log_().mul_(-2.0).sqrt_()
    normal = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1)
    return normal.view(rows, 2 * pairs)[:, :numel].reshape(rows, *shape)
