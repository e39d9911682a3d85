"""Building the embedded AbC benchmark (data/abc_embedded.py renders its exemplars and reads the built
pool): per concept, the exemplars, a Custom Diffusion model fine-tuned from the base model on them
(training/fit.py, the project's shared fit helper) and its queries, cached under a folder keyed by the
base model's weights, the concepts and the settings. A concept's folder is written atomically, so an
interrupted build resumes with the next concept:

    <root>/benchmark.json                   the base model and data, every concept and its ids
    <root>/<concept>/exemplars/             PNGs + metadata.jsonl (data=folder convention)
    <root>/<concept>/model/                 the customized checkpoint (+ customization.safetensors)
    <root>/<concept>/queries.jsonl          prompt + seed + relevant_ids + concept + concept_type
    <root>/<concept>/queries.png            the generated queries (what attribute.py will regenerate)
    <root>/<concept>/calibration_queries.jsonl  queries to tune settings on: their own seed stream
    <root>/<concept>/calibration_ids.txt    the ids they are scored within (exemplars + distractors)

Calibration runs a Hydra sweep per concept on its calibration queries, never on queries.jsonl:
    python attribute.py -m experiment=abc_embedded method=<m> data.root=<root> data.concept=<c> \
        model.path=<root>/<c>/model query.file=<root>/<c>/calibration_queries.jsonl \
        score_ids=<root>/<c>/calibration_ids.txt <grid, e.g. method.curvature.damping=1e-4,1e-3> \
        hydra.sweep.dir=<cal>/<c>
    python evaluate.py benchmark=abc 'scores=[<cal>/<c>/0,<cal>/<c>/1,...]'   (a row per setting)
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
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from diffusion_attribution.data.abc_embedded import (
    OBJECT_CONCEPTS,
    STYLE_CONCEPTS,
    TOKEN,
    concept_type,
    query_prompts,
    render_exemplars,
    write_image_folder,
)
from diffusion_attribution.data.base import CaptionedImageDataModule, DataError
from diffusion_attribution.data.customization import CustomizationDataModule
from diffusion_attribution.data.shapes import (
    ShapesDataModule,
)
from diffusion_attribution.models.pipeline import TextToImageModel, load_training_config
from diffusion_attribution.models.sampling import generate
from diffusion_attribution.training.customization import CustomDiffusionModule
from diffusion_attribution.training.fit import fit_and_export
from diffusion_attribution.utils.fingerprint import hash_json, model_fingerprint
from diffusion_attribution.utils.images import image_grid, to_uint8

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

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
    params: str = "all"  # the UNet weights that train (models/weight_subsets.py); kv: Custom Diffusion
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
    config = {
        "customization": asdict(settings),
        "base_model": str(base_checkpoint),
        "exemplars": str(exemplar_dir),
    }

    def export(checkpoint: Path) -> None:
        module.model.cpu()
        module.save_customized(checkpoint, config=config)

    return fit_and_export(module, trainer, out_dir, export, datamodule=datamodule)


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
        write_calibration_queries(root, name, settings.seed + 1, num_distractors)
    return root


def write_calibration_queries(
    root: Path, name: str, seed: int, num_distractors: int, count: int = 4, distractors: int = 300
) -> None:
    """The concept's calibration queries: `count` prompts and sampling seeds from seed stream `seed`
    (the evaluation's stream is settings.seed, so no seed is shared), with the exemplars as relevant
    ids; and the ids they are scored within: the exemplars and `distractors` base images drawn with
    numpy's default_rng(0) (a sweep of 306 ids takes seconds). Cheap and deterministic: written for
    builds made before they existed too."""
    folder = root / name
    evaluation = json.loads((folder / "queries.jsonl").read_text().splitlines()[0])
    relevant = [int(i) for i in evaluation["relevant_ids"]]
    lines = [
        json.dumps(
            {
                "prompt": prompt,
                "seed": sampling_seed,
                "relevant_ids": relevant,
                "concept": name,
                "concept_type": concept_type(name),
            }
        )
        for prompt, sampling_seed in query_prompts(name, count, seed)
    ]
    base = np.random.default_rng(0).choice(num_distractors, min(distractors, num_distractors), replace=False)
    ids = sorted(set(base.tolist()) | set(relevant))
    for file_name, text in (
        ("calibration_queries.jsonl", "\n".join(lines) + "\n"),
        ("calibration_ids.txt", "\n".join(str(i) for i in ids) + "\n"),
    ):
        tmp = folder / f".{file_name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / file_name)
