"""`data=abc_embedded`: the AbC benchmark (Wang et al., ICCV 2023) rebuilt inside the embedded world.

Each concept is a handful of exemplar images the base world lacks, rendered deterministically from a
seed, and a Custom Diffusion model (a new token `<new1>` + cross-attention K/V) fine-tuned from the
base model on them. Images that model generates from prompts with the token are influenced by the
exemplars by construction, so attribution must find the exemplars among the base model's training
set (the distractors).

- OBJECT concepts: a new shape (star, crescent, heart, arrow) drawn like the world's objects: one
  object instance each, like AbC's (a particular toy or pet), so its colour is fixed (the yellow star,
  the blue crescent, ...) while backgrounds, positions and sizes vary; captions put the token where a
  shape word goes ("a yellow <new1> on a black background").
- STYLE concepts: a look applied to ordinary world images (inverted, pixelated, sepia, framed);
  captions put the token where the world's rare-concept adjectives go
  ("a <new1> red circle on a black background").

The benchmark is built by `evaluation/abc_embedded_build.py` (a customized model and queries per
concept); this module renders the exemplars and reads the built pool.

The candidate pool of a concept (`AbcEmbeddedDataModule`, `data=abc_embedded data.root=<root>
data.concept=<name>`) is the base training set (ids 0..N-1, unchanged) followed by the concept's
exemplars (ids N..N+E-1); the queries' `relevant_ids` are those exemplar ids.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffusion_attribution.data.abc import PoolWithExemplarsSource
from diffusion_attribution.data.base import CaptionedImageDataModule, CaptionedImageSource, DataError
from diffusion_attribution.data.folder import ImageFolderSource
from diffusion_attribution.data.shapes import (
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLOURS,
    SHAPES,
    SUPERSAMPLE,
    ShapesDataModule,
    ShapesWorldConfig,
    render,
    sample_attributes,
)

log = logging.getLogger(__name__)


TOKEN = "<new1>"


OBJECT_CONCEPTS = ("star", "crescent", "heart", "arrow")


# An object concept is one instance with its own colour (format 3). In format 2 each exemplar and query
# drew its colour afresh, so a "blue <new1>" query shared its colour with one exemplar at most, and
# every method ranked same-colour distractors above the other exemplars: the ground truth then asked
# for shape-only retrieval across colours, which AbC's object instances never ask.
OBJECT_COLOURS = {"star": "yellow", "crescent": "blue", "heart": "red", "arrow": "green"}


STYLE_CONCEPTS = ("inverted", "pixelated", "sepia", "framed")


# Olive: a colour neither world uses (the distinct world's striped marks took the first frame's magenta,
# FORMAT_VERSION 1, so a framed exemplar looked like a striped mark there).
FRAME = (150, 160, 0)


SEPIA_DARK, SEPIA_LIGHT = np.array([60, 35, 15], np.float32), np.array([245, 225, 180], np.float32)


def _concept_key(name: str) -> int:
    """A stable integer per concept (its random streams), validating the name."""
    return OBJECT_CONCEPTS.index(name) if concept_type(name) == "object" else 100 + STYLE_CONCEPTS.index(name)


def concept_type(name: str) -> str:
    if name in OBJECT_CONCEPTS:
        return "object"
    if name in STYLE_CONCEPTS:
        return "style"
    raise DataError(
        f"Unknown AbC concept {name!r}; objects: {list(OBJECT_CONCEPTS)}, styles: {list(STYLE_CONCEPTS)}."
    )


# ------------------------------------------------------------------------------------------ rendering
def _object_mask(name: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """The new objects' silhouettes (on the supersampled grid), sized like the world's shapes."""
    dx, dy = (xx - cx) / r, (yy - cy) / r  # unit coordinates, y down
    if name == "star":  # five points, apex up: radius between inner 0.42 and outer 1.0 by angle
        angle = np.arctan2(dx, -dy)
        sector = np.mod(angle, 2 * np.pi / 5) - np.pi / 5
        outer, inner = 1.0, 0.42
        # the boundary between a point's tip and its two inner corners, linearly in angle
        edge = inner + (outer - inner) * (1 - np.abs(sector) / (np.pi / 5))
        return np.hypot(dx, dy) <= edge
    if name == "crescent":  # a disc minus a shifted disc, horns to the right
        return (dx**2 + dy**2 <= 1.0) & ((dx - 0.5) ** 2 + (dy + 0.1) ** 2 > 0.62)
    if name == "heart":  # two lobes on top of a downward point
        x, y = dx * 1.15, -dy * 1.15 + 0.2
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    if name == "arrow":  # pointing right: a shaft and a triangular head
        shaft = (dx >= -1.0) & (dx <= 0.15) & (np.abs(dy) <= 0.28)
        head = (dx >= 0.1) & (dx <= 1.0) & (np.abs(dy) <= 0.9 * (1.0 - dx) / 0.9)
        return shaft | head
    raise DataError(f"Unknown object concept {name!r}; known: {list(OBJECT_CONCEPTS)}.")


def render_object(attributes: dict[str, Any], name: str, resolution: int) -> np.ndarray:
    """A new object in the world's drawing style (supersampled, box-filtered): uint8 [R, R, 3]."""
    size = resolution * SUPERSAMPLE
    unit = size / 32
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = np.asarray(attributes["background_rgb"], dtype=np.float32)
    mask = _object_mask(
        name, xx, yy, attributes["cx"] * unit, attributes["cy"] * unit, attributes["radius"] * unit
    )
    canvas[mask] = np.asarray(attributes["rgb"], dtype=np.float32)
    small = canvas.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.round(small), 0, 255).astype(np.uint8)


def apply_style(image: np.ndarray, name: str) -> np.ndarray:
    """A style (a look for any image) applied to a rendered world image: uint8 [R, R, 3]."""
    pixels = image.astype(np.float32)
    resolution = image.shape[0]
    if name == "inverted":
        out = 255.0 - pixels
    elif name == "pixelated":  # 4x4-pixel mosaic blocks (at 32 px: an 8x8 mosaic)
        block = max(1, resolution // 8)
        small = pixels.reshape(resolution // block, block, resolution // block, block, 3).mean(axis=(1, 3))
        out = small.repeat(block, axis=0).repeat(block, axis=1)
    elif name == "sepia":  # luminance mapped onto a brown-to-cream ramp
        luminance = (pixels @ np.array([0.299, 0.587, 0.114], np.float32))[..., None] / 255.0
        out = SEPIA_DARK + luminance * (SEPIA_LIGHT - SEPIA_DARK)
    elif name == "framed":  # a thick olive frame around the picture
        out = pixels.copy()
        width = max(1, round(3 * resolution / 32))
        frame = np.zeros(image.shape[:2], dtype=bool)
        frame[:width], frame[-width:], frame[:, :width], frame[:, -width:] = True, True, True, True
        out[frame] = FRAME
    else:
        raise DataError(f"Unknown style concept {name!r}; known: {list(STYLE_CONCEPTS)}.")
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def exemplar_caption_desc(name: str, colour: str, shape: str | None) -> str:
    """The object description with the token: in the shape slot (objects) or the adjective slot (styles)."""
    if concept_type(name) == "object":
        return f"{colour} {TOKEN}"
    return f"{TOKEN} {colour} {shape}"


def concept_captions(name: str, colour: str, background: str, shape: str | None = None) -> list[str]:
    desc = exemplar_caption_desc(name, colour, shape)
    return [t.format(desc=desc, background=background) for t in CAPTION_TEMPLATES]


def concept_prompt(name: str, colour: str, background: str, shape: str | None = None) -> str:
    return concept_captions(name, colour, background, shape)[0]


def _balanced_choices(rng: np.random.Generator, options: tuple[str, ...], count: int) -> list[str]:
    """`count` draws covering the options evenly: shuffled rounds of all options, cut to `count`."""
    rounds = -(-count // len(options))
    return [str(v) for _ in range(rounds) for v in rng.permutation(list(options))][:count]


def _concept_colours(rng: np.random.Generator, name: str, count: int) -> list[str]:
    """Colour words: balanced draws for a style, the instance's own colour for an object. The draws are
    made either way, so the streams that follow (backgrounds, shapes) are the same for both kinds."""
    colours = _balanced_choices(rng, tuple(COLOURS), count)
    return [OBJECT_COLOURS[name]] * count if concept_type(name) == "object" else colours


def render_exemplars(
    name: str, count: int, seed: int, resolution: int = 32
) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """The concept's exemplars: images and records (captions + attributes), from `seed` alone."""
    rng = np.random.default_rng([seed, _concept_key(name)])
    kind = concept_type(name)
    colours = _concept_colours(rng, name, count)
    backgrounds = _balanced_choices(rng, tuple(BACKGROUNDS), count)
    shapes = _balanced_choices(rng, SHAPES, count)
    world = ShapesWorldConfig(resolution=resolution)
    images, records = [], []
    for k in range(count):
        attributes = sample_attributes(rng, world, None)
        attributes["colour"], attributes["background"] = colours[k], backgrounds[k]
        jitter = rng.integers(-8, 9, size=3)
        attributes["rgb"] = [
            int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colours[k]], jitter, strict=True)
        ]
        attributes["background_rgb"] = list(BACKGROUNDS[backgrounds[k]])
        if kind == "object":
            attributes["shape"] = None
            image = render_object(attributes, name, resolution)
        else:
            attributes["shape"] = shapes[k]
            image = apply_style(render(attributes, resolution), name)
        record = {
            "text": concept_captions(name, colours[k], backgrounds[k], attributes["shape"]),
            **attributes,
            "concept": name,
            "concept_type": kind,
        }
        images.append(image)
        records.append(record)
    return images, records


def write_image_folder(folder: Path, images: list[np.ndarray], records: list[dict[str, Any]]) -> Path:
    """PNG files + metadata.jsonl (the data=folder convention)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for k, (image, record) in enumerate(zip(images, records, strict=True)):
        file_name = f"images/{k:03d}.png"
        Image.fromarray(image).save(folder / file_name)
        lines.append(json.dumps({"file_name": file_name, **record}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def query_prompts(name: str, count: int, seed: int) -> list[tuple[str, int]]:
    """(prompt, sampling seed) pairs for the concept's queries: colours/backgrounds (and, for styles,
    shapes) drawn from their own seeded stream, different seeds per query."""
    rng = np.random.default_rng([seed, 7919, _concept_key(name)])
    colours = _concept_colours(rng, name, count)
    backgrounds = _balanced_choices(rng, tuple(BACKGROUNDS), count)
    shapes = _balanced_choices(rng, SHAPES, count)
    kind = concept_type(name)
    return [
        (
            concept_prompt(name, colours[k], backgrounds[k], None if kind == "object" else shapes[k]),
            int(seed * 1000 + k),
        )
        for k in range(count)
    ]


# ------------------------------------------------------------------------------------------ pool
class AbcEmbeddedDataModule(CaptionedImageDataModule):
    """`data=abc_embedded data.root=<built benchmark> data.concept=<name>`: the base training set
    (ids 0..N-1, as the base model saw them) followed by the concept's exemplars (ids N..N+E-1)."""

    def __init__(self, root: str, concept: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.concept = concept

    @property
    def info(self) -> dict[str, Any]:
        path = self.root / "benchmark.json"
        if not path.is_file():
            raise DataError(
                f"{path} does not exist: data.root must be a benchmark built by scripts/reproduce/abc_embedded.py "
                "(or evaluation.abc_embedded_build.build_abc_embedded)."
            )
        return json.loads(path.read_text())

    def build_source(self) -> CaptionedImageSource:
        info = self.info
        if self.concept not in info["concepts"]:
            raise DataError(
                f"data.concept={self.concept!r} is not in {self.root}; it has {sorted(info['concepts'])}."
            )
        folder = self.root / self.concept / "exemplars"
        if not folder.is_dir():
            raise DataError(f"{folder} does not exist: the concept was not built (rerun the builder).")
        distractors = ShapesDataModule(**info["base_data"], resolution=self.resolution)
        return PoolWithExemplarsSource(distractors.source, ImageFolderSource(folder))

    @property
    def exemplar_ids(self) -> list[int]:
        return self.source.exemplar_ids  # type: ignore[attr-defined]
