"""A seeded random projection of per-sample gradients to k dimensions (Johnson–Lindenstrauss), as
TRAK and D-TRAK use to make d-dimensional gradients storable.

The d × k matrix is never held: the flattened gradient of each parameter is cut into fixed row
blocks of `block_rows` coordinates, and each block's [rows, k] slice of the matrix is generated from
a generator keyed by (seed, stream, parameter name, block index). A gradient's projection is the
sum of its blocks' products, added in a fixed order (parameters in the order given, blocks in
order), in float64: the result depends only on the seed, the parameter names and shapes, `dim`,
`kind` and `block_rows`, never on how many examples are projected together (float64 products
rounded to float32 are identical for any batch; float32 matrix products are not, see the tests).

Entries are N(0, 1) ("gaussian") or ±1 ("rademacher"), scaled by 1/√k so that E‖Pg‖² = ‖g‖² and
inner products are preserved in expectation, with a relative error of order √(2/k).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence

import torch

from diffusion_attribution.utils.seeding import Stream, seed_from_keys

# Separates the projection's random stream from every other keyed stream.
PROJECTION_KINDS = ("gaussian", "rademacher")


class ProjectionError(ValueError):
    """A projection that cannot be made as asked (e.g. more dimensions than the gradient has)."""


def name_key(name: str) -> int:
    """A stable integer for a parameter name (keys the name's blocks)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


class BlockwiseProjection:
    """P: R^d -> R^k, d = the total size of the named parameters; see the module docstring.

    `device`: where the blocks are generated. "cpu" (default) draws every block with a CPU
    generator (identical numbers on every machine) and moves it to the gradients' device for the
    product. A CUDA device draws with that device's generator: much faster at paper scale (a 7.1M ×
    32,768 matrix is 2.3e11 numbers per pass) and identical across runs on the same GPU model, but not
    equal to the CPU numbers; a train side and its queries must use the same setting (`describe()`
    records it, so cache keys differ).
    """

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int] | torch.Size],
        dim: int,
        seed: int = 0,
        kind: str = "gaussian",
        block_rows: int = 1024,
        device: str | torch.device = "cpu",
    ) -> None:
        if kind not in PROJECTION_KINDS:
            raise ProjectionError(f"Unknown projection kind {kind!r}; options: {PROJECTION_KINDS}.")
        if block_rows < 1:
            raise ProjectionError(f"block_rows must be at least 1, got {block_rows}.")
        self.sizes = {name: int(math.prod(shape)) for name, shape in shapes.items()}
        self.num_inputs = sum(self.sizes.values())
        if not self.sizes or self.num_inputs == 0:
            raise ProjectionError("Nothing to project: no parameters were given.")
        if dim < 1 or dim > self.num_inputs:
            raise ProjectionError(
                f"Projection dimension {dim} is out of range for {self.num_inputs:,} weights: a random projection "
                f"maps the gradient to at most as many dimensions as it has. Use 1 <= projection_dim <= "
                f"{self.num_inputs:,}, or choose a larger weight subset."
            )
        self.dim = int(dim)
        self.seed = int(seed)
        self.kind = kind
        self.block_rows = int(block_rows)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ProjectionError(
                "The projection is set to draw on CUDA, but no GPU is available: use device cpu."
            )
        self.scale = 1.0 / math.sqrt(self.dim)

    def describe(self) -> dict[str, object]:
        """What decides the numbers (for cache keys)."""
        generator = self.device.type
        if generator == "cuda":
            generator = f"cuda:{torch.cuda.get_device_name(self.device)}"
        return {
            "dim": self.dim,
            "seed": self.seed,
            "kind": self.kind,
            "block_rows": self.block_rows,
            "generator": generator,
            "sizes": self.sizes,
        }

    def blocks(self, name: str) -> Iterator[tuple[int, int]]:
        """(start, stop) coordinate ranges of the parameter's row blocks."""
        size = self.sizes[name]
        for start in range(0, size, self.block_rows):
            yield start, min(start + self.block_rows, size)

    def block(self, name: str, index: int, device: str | torch.device | None = None) -> torch.Tensor:
        """The [rows, k] float64 slice of P for block `index` of parameter `name` (scaled), on
        `device` (default: where it was drawn)."""
        start = index * self.block_rows
        rows = min(self.block_rows, self.sizes[name] - start)
        if rows <= 0:
            raise IndexError(f"Parameter {name} has no block {index}.")
        generator = torch.Generator(self.device)
        generator.manual_seed(seed_from_keys(self.seed, Stream.PROJECTION, name_key(name), index))
        if self.kind == "gaussian":
            values = torch.randn((rows, self.dim), generator=generator, device=self.device)
        else:
            values = torch.randint(0, 2, (rows, self.dim), generator=generator, device=self.device) * 2 - 1
        return values.to(device or self.device, torch.float64) * self.scale

    def project(self, gradients: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B, k] float64 projections of per-sample gradients {name: [B, *shape]} (every name of the
        projection must be given; the rows are projected independently of each other)."""
        missing = [name for name in self.sizes if name not in gradients]
        if missing:
            raise ProjectionError(
                f"Gradients are missing {len(missing)} projected parameters, e.g. {missing[:3]}."
            )
        first = next(iter(gradients.values()))
        batch, device = first.shape[0], first.device
        out = torch.zeros((batch, self.dim), dtype=torch.float64, device=device)
        for name, size in self.sizes.items():
            flat = gradients[name].reshape(batch, -1)
            if flat.shape[1] != size:
                raise ProjectionError(
                    f"Gradient of {name} has {flat.shape[1]} entries per sample; the projection was made for {size}."
                )
            flat = flat.to(device, torch.float64)
            for index, (start, stop) in enumerate(self.blocks(name)):
                out += flat[:, start:stop] @ self.block(name, index, device)
        return out

    def matrix(self) -> torch.Tensor:
        """The whole [d, k] matrix (float64), rows in parameter order: for tests and tiny checks only."""
        return torch.cat(
            [self.block(name, index) for name in self.sizes for index, _ in enumerate(self.blocks(name))]
        )
