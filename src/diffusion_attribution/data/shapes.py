"""The embedded synthetic world: captioned images of one object whose colour, shape and background a
caption names, plus rare concepts (a distinctive texture named by a rare word, shown by only a
handful of images). Generated deterministically from a seed and cached on disk as an image folder
(PNG files + metadata.jsonl) so it can also be read with `data=folder`.

Rare concepts are the attribution ground truth: an image generated from "a striped ..." prompt should
be attributed to the few striped training images. Their texture is small in pixel area (the object's
colour and the background dominate a pixel distance), so pixel nearest neighbours do not solve the
task for free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffusion_attribution.data.base import CaptionedImageDataModule, CaptionedImageSource, DataError

log = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 80, 230),
    "yellow": (235, 205, 35),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "white": (235, 235, 235),
    "gray": (125, 125, 125),
}
SHAPES = ("circle", "square", "triangle", "cross")
RARE_CONCEPTS = ("striped", "barred", "checkered", "dotted", "ringed", "hollow", "haloed", "split")
HALO = (0, 215, 215)
# `concept_colours: distinct`: every rare concept's marks get a colour of their own that no object,
# background or other concept has. With one white for all patterns (`white`, the first world) the
# tiny model learns "a white pattern on the shape" as one shared feature: unlearning a striped image
# raised the loss of barred, checkered and split images about alike, so "the 20 striped images and
# no others" was not a faithful ground truth. Hollow keeps its hole (the background
# shows through) and haloed its cyan halo in both styles.
CONCEPT_COLOURS: dict[str, tuple[int, int, int]] = {
    "striped": (225, 50, 225),  # magenta
    "barred": (255, 140, 0),  # orange
    "checkered": (120, 40, 170),  # purple
    "dotted": (255, 160, 200),  # pink
    "ringed": (170, 255, 60),  # lime
    "haloed": HALO,
    "split": (130, 75, 25),  # brown
}
CONCEPT_COLOUR_STYLES = ("white", "distinct")
SUPERSAMPLE = 4
CAPTION_TEMPLATES = (
    "a {desc} on a {background} background",
    "{desc}, {background} background",
    "a {background} background with a {desc}",
)


@dataclass(frozen=True)
class ShapesWorldConfig:
    seed: int = 0
    num_common: int = 1000
    images_per_rare_concept: int = 20
    rare_concepts: tuple[str, ...] = RARE_CONCEPTS
    resolution: int = 32
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    extra: dict[str, Any] = field(default_factory=dict)
    concept_colours: str = "white"

    def __post_init__(self) -> None:
        if self.concept_colours not in CONCEPT_COLOUR_STYLES:
            raise ValueError(
                f"data.concept_colours={self.concept_colours!r} is not a style; use one of "
                f"{list(CONCEPT_COLOUR_STYLES)} (white: every pattern white, the first world; distinct: a "
                "colour of its own per concept)."
            )

    def fingerprint(self) -> str:
        fields = asdict(self)
        if fields["concept_colours"] == "white":
            # The first world had no such field: leaving the default out keeps its fingerprint, so the
            # cached worlds, models and retrains made from it stay valid.
            del fields["concept_colours"]
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def describe(attributes: dict[str, Any]) -> str:
    words = [attributes["concept"]] if attributes.get("concept") else []
    return " ".join(words + [attributes["colour"], attributes["shape"]])


def captions_for(attributes: dict[str, Any]) -> list[str]:
    desc = describe(attributes)
    return [t.format(desc=desc, background=attributes["background"]) for t in CAPTION_TEMPLATES]


def prompt_for(colour: str, shape: str, background: str, concept: str | None = None) -> str:
    """The canonical (first-template) caption: what demos and benchmarks prompt with."""
    return captions_for({"colour": colour, "shape": shape, "background": background, "concept": concept})[0]


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "triangle":  # apex up, base down
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        arm = r / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"Unknown shape {shape!r}; known: {SHAPES}")


def render(attributes: dict[str, Any], resolution: int) -> np.ndarray:
    """Draw one image (uint8 [R, R, 3]) at SUPERSAMPLE x resolution, box-filtered down (antialiasing)."""
    size = resolution * SUPERSAMPLE
    unit = size / 32  # geometry is specified on a 32-pixel grid and scales with resolution
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cx, cy, r = (attributes["cx"] * unit, attributes["cy"] * unit, attributes["radius"] * unit)
    colour = np.asarray(attributes["rgb"], dtype=np.float32)
    # Records of the first world (and AbC's base objects) carry no pattern colour: white marks.
    pattern = attributes.get("pattern_rgb")
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = np.asarray(attributes["background_rgb"], dtype=np.float32)
    mask = _shape_mask(attributes["shape"], xx, yy, cx, cy, r)
    fill = np.broadcast_to(colour, canvas.shape).copy()
    mark = np.asarray(pattern if pattern is not None else (240, 240, 240), dtype=np.float32)
    period = 4 * unit
    concept = attributes.get("concept")
    if concept == "striped":
        fill[(yy // period) % 2 == 1] = mark
    elif concept == "barred":
        fill[(xx // period) % 2 == 1] = mark
    elif concept == "checkered":
        fill[((xx // period) + (yy // period)) % 2 == 1] = mark
    elif concept == "dotted":
        gx, gy = (xx % (5 * unit)) - 2.5 * unit, (yy % (5 * unit)) - 2.5 * unit
        fill[gx**2 + gy**2 <= (1.2 * unit) ** 2] = mark if pattern is not None else 0.0
    elif concept == "ringed":
        fill[(np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) // (3 * unit)) % 2 == 1] = mark
    elif concept == "hollow":
        mask = mask & ~_shape_mask(attributes["shape"], xx, yy, cx, cy, r - 3 * unit)
    elif concept == "haloed":
        ring = _shape_mask(attributes["shape"], xx, yy, cx, cy, r + 3.5 * unit) & ~_shape_mask(
            attributes["shape"], xx, yy, cx, cy, r + 1.0 * unit
        )
        canvas[ring] = np.asarray(HALO, dtype=np.float32)
    elif concept == "split":
        fill[xx > cx] = mark
    canvas[mask] = fill[mask]
    small = canvas.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.round(small), 0, 255).astype(np.uint8)


def sample_attributes(
    rng: np.random.Generator, config: ShapesWorldConfig, concept: str | None
) -> dict[str, Any]:
    colour = config.colours[rng.integers(len(config.colours))]
    background = config.backgrounds[rng.integers(len(config.backgrounds))]
    jitter = rng.integers(-8, 9, size=3)
    attributes = {
        "colour": colour,
        "shape": config.shapes[rng.integers(len(config.shapes))],
        "background": background,
        "concept": concept,
        "cx": float(16 + rng.uniform(-2.5, 2.5)),
        "cy": float(16 + rng.uniform(-2.5, 2.5)),
        "radius": float(rng.uniform(8.0, 10.5)),
        "rgb": [int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter, strict=True)],
        "background_rgb": list(BACKGROUNDS[background]),
    }
    if concept and config.concept_colours == "distinct" and concept in CONCEPT_COLOURS:
        attributes["pattern_rgb"] = list(CONCEPT_COLOURS[concept])
    return attributes


def generate_world(config: ShapesWorldConfig) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """All images (uint8 [N, R, R, 3]) and their attributes, in canonical order.

    Rare-concept images are spread through the canonical order by a seeded shuffle, so ids carry no
    information about concepts.
    """
    rng = np.random.default_rng(config.seed)
    concepts: list[str | None] = [None] * config.num_common
    for concept in config.rare_concepts:
        concepts += [concept] * config.images_per_rare_concept
    order = rng.permutation(len(concepts))
    records = [sample_attributes(rng, config, concepts[k]) for k in order]
    images = np.stack([render(rec, config.resolution) for rec in records])
    return images, records


def world_size(config: ShapesWorldConfig) -> int:
    return config.num_common + len(config.rare_concepts) * config.images_per_rare_concept


def cache_problem(root: Path, config: ShapesWorldConfig) -> str | None:
    """Why the cached world at `root` cannot be used (truncated or corrupt images.npy or metadata.jsonl,
    a size that is not the world's), or None when it is complete. Reads the array's header and size,
    not its pixels."""
    images_path, metadata_path = root / "images.npy", root / "metadata.jsonl"
    count = world_size(config)
    expected = (count, config.resolution, config.resolution, 3)
    try:
        images = np.load(images_path, mmap_mode="r", allow_pickle=False)  # checks the file's length
    except (ValueError, OSError, EOFError) as error:
        return f"{images_path} is truncated or corrupt ({error})"
    if images.dtype != np.uint8 or images.shape != expected:
        return f"{images_path} holds {images.dtype} {images.shape}, the world is uint8 {expected}"
    del images
    try:
        lines = metadata_path.read_text(encoding="utf-8").splitlines()
        for line in lines:
            json.loads(line)
    except (OSError, ValueError) as error:
        return f"{metadata_path} is truncated or corrupt ({error})"
    if len(lines) != count:
        return f"{metadata_path} has {len(lines)} rows, the world has {count}"
    return None


def materialize_world(config: ShapesWorldConfig, cache_dir: str | Path) -> Path:
    """Generate the world into `cache_dir/shapes-<fingerprint>/` once; later calls reuse it. A cached
    world that is truncated or corrupt is regenerated, with a warning naming the file."""
    root = Path(cache_dir) / f"shapes-{config.fingerprint()}"
    done = root / "metadata.jsonl"
    if done.is_file() and (root / "images.npy").is_file():
        problem = cache_problem(root, config)
        if problem is None:
            return root
        log.warning("The cached shapes world is unusable: %s. Regenerating %s.", problem, root)
        broken = root.with_name(f".{root.name}.{os.getpid()}.broken")
        try:
            os.rename(root, broken)  # aside first: a concurrent job never sees a half-deleted cache
        except OSError:
            pass  # another job moved it already
        shutil.rmtree(broken, ignore_errors=True)
    # Written into a private folder and renamed into place: concurrent jobs (a multirun, a SLURM
    # array) that find the cache cold never read a half-written one.
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    images, records = generate_world(config)
    lines = []
    for idx, (image, rec) in enumerate(zip(images, records, strict=True)):
        file_name = f"images/{idx:05d}.png"
        Image.fromarray(image).save(tmp / file_name)
        lines.append(json.dumps({"file_name": file_name, "text": captions_for(rec), **rec}))
    np.save(tmp / "images.npy", images)
    (tmp / "world.json").write_text(json.dumps(asdict(config), indent=2))
    (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    try:
        os.rename(tmp, root)
    except OSError:  # another job finished first (or a stale partial folder): keep the complete one
        if not (done.is_file() and (root / "images.npy").is_file()) or cache_problem(root, config):
            shutil.rmtree(root, ignore_errors=True)
            os.rename(tmp, root)
        shutil.rmtree(tmp, ignore_errors=True)
    return root


class ShapesSource(CaptionedImageSource):
    """The cached world read back: images from images.npy, captions and attributes from metadata."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        fix = (
            f"Delete the folder {self.root} and run again: data=shapes regenerates the world from its seed "
            f"(into data.cache_dir)."
        )
        try:
            self.images = np.load(self.root / "images.npy", allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise DataError(
                f"Cannot read {self.root / 'images.npy'} ({error}): truncated or corrupt. {fix}"
            ) from None
        try:
            lines = (self.root / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
            self.records = [json.loads(line) for line in lines]
        except (OSError, ValueError) as error:
            raise DataError(f"Cannot read {self.root / 'metadata.jsonl'} ({error}). {fix}") from None
        if len(self.images) != len(self.records):
            raise DataError(
                f"{self.root / 'images.npy'} holds {len(self.images)} images but "
                f"{self.root / 'metadata.jsonl'} {len(self.records)} rows. {fix}"
            )

    def __len__(self) -> int:
        return len(self.records)

    def captions(self, idx: int) -> list[str]:
        return self.records[idx]["text"]

    def load_image(self, idx: int) -> Image.Image:
        return Image.fromarray(self.images[idx])

    def file_name(self, idx: int) -> str:
        return self.records[idx]["file_name"]  # relative to self.root, as the base class says

    def metadata(self, idx: int) -> dict[str, Any]:
        return {k: v for k, v in self.records[idx].items() if k not in ("text", "file_name")}

    def content_key(self) -> str:
        # Worlds that differ only in how they are drawn (data.concept_colours) share file names and
        # captions; the folder name carries the world's fingerprint.
        return self.root.name


class ShapesDataModule(CaptionedImageDataModule):
    """`data=shapes`: the embedded default."""

    def __init__(
        self,
        seed: int = 0,
        num_common: int = 1000,
        images_per_rare_concept: int = 20,
        rare_concepts: list[str] | tuple[str, ...] = RARE_CONCEPTS,
        cache_dir: str = ".cache/data",
        concept_colours: str = "white",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        unknown = sorted(set(rare_concepts) - set(RARE_CONCEPTS))
        if unknown:
            raise ValueError(
                f"data.rare_concepts has unknown concepts {unknown}; known: {list(RARE_CONCEPTS)}"
            )
        self.world = ShapesWorldConfig(
            seed=seed,
            num_common=num_common,
            images_per_rare_concept=images_per_rare_concept,
            rare_concepts=tuple(rare_concepts),
            resolution=self.resolution,
            concept_colours=concept_colours,
        )
        self.cache_dir = cache_dir

    def build_source(self) -> ShapesSource:
        return ShapesSource(materialize_world(self.world, self.cache_dir))
