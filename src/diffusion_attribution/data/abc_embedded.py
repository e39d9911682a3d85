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

`build_abc_embedded(base_checkpoint, cache_dir, ...)` makes everything once, cached under a folder keyed
by the base model's weights, the concepts and the settings (a concept's folder is written atomically,
so an interrupted build resumes with the next concept):

    <root>/benchmark.json                   the base model and data, every concept and its ids
    <root>/<concept>/exemplars/             PNGs + metadata.jsonl (data=folder convention)
    <root>/<concept>/model/                 the customized checkpoint (+ customization.safetensors)
    <root>/<concept>/queries.jsonl          prompt + seed + relevant_ids + concept + concept_type
    <root>/<concept>/queries.png            the generated queries (what attribute.py will regenerate)

The candidate pool of a concept (`AbcEmbeddedDataModule`, `data=abc_embedded data.root=<root>
data.concept=<name>`) is the base training set (ids 0..N-1, unchanged) followed by the concept's
exemplars (ids N..N+E-1); the queries' `relevant_ids` are those exemplar ids.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .base import CaptionedImageDataModule, CaptionedImageSource, DataError
from .folder import ImageFolderSource
from .shapes import (
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


# ------------------------------------------------------------------------------------------ building
# bump when the build changes what it writes (2: olive frame, the base world's colours; 3: an object
# concept is one instance with a fixed colour)
FORMAT_VERSION = 3


@dataclass(frozen=True)
class AbcEmbeddedSettings:
    """Everything that decides the built benchmark besides the base model (all in its cache key)."""

    objects: tuple[str, ...] = OBJECT_CONCEPTS
    styles: tuple[str, ...] = STYLE_CONCEPTS
    exemplars_per_concept: int = 6
    queries_per_concept: int = 4
    seed: int = 0
    # Customization of the tiny model: the new token plus every UNet weight (params="all"), not Custom
    # Diffusion's K/V alone. The tiny UNet has cross-attention only at 8x8, and with K/V alone (400 or
    # 1,000 steps at lr 3e-3) its <new1> samples were blobs in the prompt's colour, never a star or an
    # arrow, and sepia samples were noise: queries that do not show the concept are no ground truth.
    # All weights at lr 3e-4 for 400 steps draw stars, arrows and sepia pictures (lr 3e-3 destroys the
    # model). The regularisation images (the base training set) keep the rest of the world drawn.
    steps: int = 400
    params: str = "all"  # the UNet weights that train (methods/weight_subsets.py); kv: Custom Diffusion
    batch_size: int = 6
    regularization_batch_size: int = 6
    regularization_size: int | None = None  # None: the whole base training set
    lr: float = 3e-4
    embedding_lr: float = 3e-2
    prior_loss_weight: float = 1.0
    initializer_words: tuple[str | None, ...] | None = None
    # how the queries are sampled (attribute.py must regenerate them with the same settings)
    sampler: dict[str, Any] = field(
        default_factory=lambda: {"num_steps": 30, "guidance_scale": 3.0, "sampler": "ddim"}
    )

    @property
    def concepts(self) -> tuple[str, ...]:
        return tuple(self.objects) + tuple(self.styles)


def base_data_settings(base_checkpoint: str | Path) -> dict[str, Any]:
    """The embedded world the base model was trained on (ShapesDataModule settings that fix its ids)."""
    from omegaconf import OmegaConf

    from ..models.pipeline import load_training_config

    trained = load_training_config(base_checkpoint)
    if trained is None or "ShapesDataModule" not in str(trained.get("data", {}).get("_target_", "")):
        raise DataError(
            f"{base_checkpoint} was not trained on data=shapes (no training_config.yaml with the embedded world): "
            "the embedded AbC benchmark customizes a model of the embedded world."
        )
    data = OmegaConf.to_container(trained.data, resolve=False)
    # concept_colours: a base trained on the distinct world must get the distinct world as its distractors
    # (absent from checkpoints trained before the setting existed: ShapesDataModule's default, white).
    keep = ("seed", "num_common", "images_per_rare_concept", "rare_concepts", "concept_colours", "cache_dir")
    return {k: data[k] for k in keep if k in data}


def benchmark_root(base_checkpoint: str | Path, cache_dir: str | Path, settings: AbcEmbeddedSettings) -> Path:
    from ..models.pipeline import TextToImageModel
    from ..utils.fingerprint import hash_json, model_fingerprint

    base = TextToImageModel.from_pretrained(base_checkpoint)
    key = hash_json(
        [FORMAT_VERSION, model_fingerprint(base), base_data_settings(base_checkpoint), asdict(settings)]
    )
    return Path(cache_dir) / f"abc-embedded-{key}"


def customize_concept(
    base_checkpoint: str | Path,
    exemplar_dir: Path,
    regularization: CaptionedImageDataModule | None,
    settings: AbcEmbeddedSettings,
    out_dir: Path,
    seed: int,
    accelerator: str = "cpu",
) -> Path:
    """Custom Diffusion of the base model on one concept's exemplars; the checkpoint in `out_dir`."""
    import pytorch_lightning as pl

    from ..models.pipeline import TextToImageModel
    from ..modules.customization import CustomDiffusionModule
    from .customization import CustomizationDataModule

    pl.seed_everything(seed, workers=True)
    model = TextToImageModel.from_pretrained(base_checkpoint)
    datamodule = CustomizationDataModule(
        exemplars=str(exemplar_dir),
        regularization=regularization,
        regularization_size=settings.regularization_size,
        regularization_seed=seed,
        resolution=model.image_resolution,
        batch_size=settings.batch_size,
        regularization_batch_size=settings.regularization_batch_size,
    )
    initializer = list(settings.initializer_words) if settings.initializer_words else None
    module = CustomDiffusionModule(
        model,
        max_steps=settings.steps,
        tokens=[TOKEN],
        initializer_words=initializer,
        params=settings.params,
        lr=settings.lr,
        embedding_lr=settings.embedding_lr,
        warmup_steps=min(10, settings.steps // 10),
        prior_loss_weight=settings.prior_loss_weight if regularization is not None else 0.0,
    )
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=settings.steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=datamodule)
    module.model.cpu()
    config = {
        "customization": asdict(settings),
        "base_model": str(base_checkpoint),
        "exemplars": str(exemplar_dir),
    }
    return module.save_customized(out_dir, config=config)


def build_concept(
    name: str,
    base_checkpoint: str | Path,
    root: Path,
    settings: AbcEmbeddedSettings,
    num_distractors: int,
    regularization: CaptionedImageDataModule | None,
    accelerator: str = "cpu",
    resolution: int = 32,
) -> Path:
    """One concept's folder (exemplars, customized model, queries), written atomically."""
    import torch

    from ..models.pipeline import TextToImageModel
    from ..models.sampling import generate
    from ..utils.images import image_grid

    final = root / name
    if (final / "queries.jsonl").is_file():
        return final
    tmp = root / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    images, records = render_exemplars(name, settings.exemplars_per_concept, settings.seed, resolution)
    write_image_folder(tmp / "exemplars", images, records)
    seed = settings.seed * 1000 + settings.concepts.index(name)
    customize_concept(
        base_checkpoint, tmp / "exemplars", regularization, settings, tmp / "model", seed, accelerator
    )
    customized_s = time.perf_counter() - started
    model = TextToImageModel.from_pretrained(tmp / "model").eval()
    prompts = query_prompts(name, settings.queries_per_concept, settings.seed)
    with torch.no_grad():
        samples = generate(model, [p for p, _ in prompts], [s for _, s in prompts], **settings.sampler)
    relevant = list(range(num_distractors, num_distractors + len(images)))
    lines = [
        json.dumps(
            {
                "prompt": p,
                "seed": s,
                "relevant_ids": relevant,
                "concept": name,
                "concept_type": concept_type(name),
            }
        )
        for p, s in prompts
    ]
    (tmp / "queries.jsonl").write_text("\n".join(lines) + "\n")
    grid = np.concatenate([np.stack(images), _uint8(samples.images)])
    image_grid(grid, ncol=max(len(images), len(prompts)), scale=4).save(tmp / "queries.png")
    info = {
        "concept": name,
        "concept_type": concept_type(name),
        "token": TOKEN,
        "exemplar_ids": relevant,
        "queries": [{"prompt": p, "seed": s} for p, s in prompts],
        "customize_s": customized_s,
    }
    (tmp / "concept.json").write_text(json.dumps(info, indent=2))
    if final.exists():  # another build finished this concept first: keep the complete one
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    log.info("AbC concept %s built in %.0f s: %s", name, time.perf_counter() - started, final)
    return final


def _uint8(images: Any) -> np.ndarray:
    from ..utils.images import to_uint8

    return to_uint8(images)


def build_abc_embedded(
    base_checkpoint: str | Path,
    cache_dir: str | Path = ".cache/abc_embedded",
    settings: AbcEmbeddedSettings | None = None,
    accelerator: str = "cpu",
) -> Path:
    """Build (or find cached) the whole embedded benchmark for a base model; returns its root."""
    settings = settings or AbcEmbeddedSettings()
    unknown = [c for c in settings.objects if c not in OBJECT_CONCEPTS] + [
        c for c in settings.styles if c not in STYLE_CONCEPTS
    ]
    if unknown:
        raise DataError(
            f"Unknown concepts {unknown}; objects: {list(OBJECT_CONCEPTS)}, styles: {list(STYLE_CONCEPTS)}."
        )
    base_checkpoint = Path(base_checkpoint).resolve()
    root = benchmark_root(base_checkpoint, cache_dir, settings)
    root.mkdir(parents=True, exist_ok=True)
    base_data = base_data_settings(base_checkpoint)
    from ..models.pipeline import TextToImageModel

    resolution = TextToImageModel.from_pretrained(base_checkpoint).image_resolution
    distractors = ShapesDataModule(**base_data, resolution=resolution)
    num_distractors = distractors.num_examples
    info = {
        "format_version": FORMAT_VERSION,
        "base_checkpoint": str(base_checkpoint),
        "base_data": base_data,
        "resolution": resolution,
        "num_distractors": num_distractors,
        "settings": asdict(settings),
        "concepts": {c: concept_type(c) for c in settings.concepts},
    }
    (root / "benchmark.json").write_text(json.dumps(info, indent=2))
    for k, name in enumerate(settings.concepts):
        log.info("AbC concept %d/%d: %s", k + 1, len(settings.concepts), name)
        build_concept(
            name, base_checkpoint, root, settings, num_distractors, distractors, accelerator, resolution
        )
    return root


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
                f"{path} does not exist: data.root must be a benchmark built by benchmarks/abc_embedded.py "
                "(or data.abc_embedded.build_abc_embedded)."
            )
        return json.loads(path.read_text())

    def build_source(self) -> CaptionedImageSource:
        from .abc import PoolWithExemplarsSource

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
