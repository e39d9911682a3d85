"""`evaluate.py benchmark=fidelity`: does a model trained on the embedded world draw what it is told?

Generates every colour × shape × background prompt and, for each rare concept, prompts with the
attribute combinations its training images show; the attribute reader reads every generated image.
Reports per-attribute accuracy, the rare-concept hit rate (per concept), the rate at which a concept
appears unasked, a CSV of every image, a markdown table and a titled picture grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from diffusion_attribution.compute.devices import device_from_trainer
from diffusion_attribution.data.shapes import ShapesDataModule, prompt_for
from diffusion_attribution.evaluation import report
from diffusion_attribution.evaluation.attribute_reader import NONE_CONCEPT, load_or_train_reader
from diffusion_attribution.models.loading import model_from_config
from diffusion_attribution.models.sampling import generate
from diffusion_attribution.utils.images import titled_grid

log = logging.getLogger(__name__)

ATTRIBUTES = ("colour", "shape", "background")


@dataclass
class FidelityPrompt:
    prompt: str
    seed: int
    colour: str
    shape: str
    background: str
    concept: str  # NONE_CONCEPT for plain prompts


def fidelity_prompts(
    datamodule: ShapesDataModule, seeds_per_prompt: int, prompts_per_concept: int
) -> list[FidelityPrompt]:
    """All plain combinations, plus each rare concept with the attribute combinations of its own
    training images (the concept's look is what is tested, not composition with unseen attributes)."""
    world = datamodule.world
    specs: list[tuple[str, str, str, str]] = [
        (c, s, b, NONE_CONCEPT) for c, s, b in product(world.colours, world.shapes, world.backgrounds)
    ]
    source = datamodule.source
    by_concept: dict[str, list[tuple[str, str, str, str]]] = {c: [] for c in world.rare_concepts}
    for idx in range(len(source)):
        meta = source.metadata(idx)
        concept = meta.get("concept")
        if concept in by_concept and len(by_concept[concept]) < prompts_per_concept:
            combo = (meta["colour"], meta["shape"], meta["background"], concept)
            if combo not in by_concept[concept]:
                by_concept[concept].append(combo)
    for concept in world.rare_concepts:
        specs.extend(by_concept[concept])
    prompts = []
    for k, (colour, shape, background, concept) in enumerate(specs):
        text = prompt_for(colour, shape, background, None if concept == NONE_CONCEPT else concept)
        for j in range(seeds_per_prompt):
            prompts.append(FidelityPrompt(text, 1000 * j + k, colour, shape, background, concept))
    return prompts


def summarise(rows: list[dict[str, Any]], concepts: list[str]) -> dict[str, Any]:
    plain = [r for r in rows if r["concept"] == NONE_CONCEPT]
    rare = [r for r in rows if r["concept"] != NONE_CONCEPT]
    summary: dict[str, Any] = {"num_images": len(rows)}
    for name in ATTRIBUTES:
        summary[f"{name}_accuracy"] = sum(r[f"{name}_ok"] for r in rows) / max(1, len(rows))
    summary["attribute_accuracy"] = sum(summary[f"{n}_accuracy"] for n in ATTRIBUTES) / len(ATTRIBUTES)
    summary["all_attributes_accuracy"] = sum(all(r[f"{n}_ok"] for n in ATTRIBUTES) for r in rows) / max(
        1, len(rows)
    )
    summary["rare_concept_hit_rate"] = sum(r["concept_ok"] for r in rare) / max(1, len(rare))
    summary["per_concept_hit_rate"] = {
        c: sum(r["concept_ok"] for r in rare if r["concept"] == c)
        / max(1, sum(1 for r in rare if r["concept"] == c))
        for c in concepts
    }
    summary["unasked_concept_rate"] = sum(r["read_concept"] != NONE_CONCEPT for r in plain) / max(
        1, len(plain)
    )
    summary["concepts_recognised"] = sum(v > 0 for v in summary["per_concept_hit_rate"].values())
    summary["num_concepts"] = len(concepts)
    return summary


def markdown_table(summary: dict[str, Any], reader_accuracy: dict[str, float]) -> str:
    keys = (*[f"{n}_accuracy" for n in ATTRIBUTES], "attribute_accuracy", "all_attributes_accuracy")
    rows = [[key, f"{summary[key]:.3f}"] for key in keys]
    rows.append(["rare_concept_hit_rate", f"{summary['rare_concept_hit_rate']:.3f}"])
    rows.append(
        ["concepts recognised (hit rate > 0)", f"{summary['concepts_recognised']}/{summary['num_concepts']}"]
    )
    rows.append(["unasked_concept_rate", f"{summary['unasked_concept_rate']:.3f}"])
    concepts = [[c, f"{v:.2f}"] for c, v in summary["per_concept_hit_rate"].items()]
    reader = ", ".join(f"{k} {v:.3f}" for k, v in reader_accuracy.items())
    return (
        report.markdown_table(["metric", "value"], rows)
        + "\n\n"
        + report.markdown_table(["concept", "hit rate"], concepts)
        + f"\n\nAttribute reader accuracy on held-out real images: {reader}\n"
    )


def run_fidelity_benchmark(
    cfg: DictConfig,
    run_dir: str | Path,
    seeds_per_prompt: int = 2,
    prompts_per_concept: int = 4,
    num_steps: int = 30,
    guidance_scale: float = 3.0,
    sampler: str = "ddim",
    batch_size: int = 64,
    reader_cache_dir: str = ".cache/data",
) -> dict[str, Any]:
    run_dir = Path(run_dir)
    datamodule = hydra.utils.instantiate(cfg.data)
    if not isinstance(datamodule, ShapesDataModule):
        raise ValueError(
            "benchmark=fidelity reads images with the embedded world's attribute reader, so it needs "
            f"data=shapes (got {type(datamodule).__name__})."
        )
    model = model_from_config(cfg.model)
    model.to(device_from_trainer(cfg.get("trainer")))
    reader, reader_accuracy = load_or_train_reader(datamodule.world, reader_cache_dir)
    prompts = fidelity_prompts(datamodule, seeds_per_prompt, prompts_per_concept)
    log.info("Generating %d images (%d sampler steps each)", len(prompts), num_steps)
    samples = generate(
        model,
        [p.prompt for p in prompts],
        [p.seed for p in prompts],
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        sampler=sampler,
        batch_size=batch_size,
    )
    images = samples.images.cpu()
    reads = reader.read(images)
    rows = []
    for p, read in zip(prompts, reads, strict=True):
        row: dict[str, Any] = {"prompt": p.prompt, "seed": p.seed, "concept": p.concept}
        for name in ATTRIBUTES:
            row[name] = getattr(p, name)
            row[f"read_{name}"] = read[name]
            row[f"{name}_ok"] = read[name] == getattr(p, name)
        row["read_concept"] = read["concept"]
        row["concept_ok"] = read["concept"] == p.concept
        rows.append(row)
    summary = summarise(rows, list(datamodule.world.rare_concepts))
    summary["reader_heldout_accuracy"] = reader_accuracy
    summary["sampler"] = {"name": sampler, "num_steps": num_steps, "guidance_scale": guidance_scale}

    report.with_headline(summary, "rare_concept_hit_rate", summary["rare_concept_hit_rate"])
    report.write_csv(run_dir / "fidelity.csv", rows)
    report.write_json(run_dir / "metrics.json", summary)
    report.write_text(run_dir / "fidelity.md", markdown_table(summary, reader_accuracy))
    _write_grids(images, rows, run_dir)
    log.info("Fidelity: %s", {k: v for k, v in summary.items() if not isinstance(v, dict)})
    return summary


def _write_grids(images: torch.Tensor, rows: list[dict[str, Any]], run_dir: Path) -> None:
    """One grid for plain prompts and one for rare concepts; a title lists what the reader saw, with
    the wrong readings in capitals so misses stand out."""

    def title(r: dict[str, Any]) -> str:
        readings = [(r[f"read_{n}"], r[f"{n}_ok"]) for n in ATTRIBUTES]
        if r["concept"] != NONE_CONCEPT or r["read_concept"] != NONE_CONCEPT:
            readings.insert(0, (r["read_concept"], r["concept_ok"]))
        return " ".join(word if ok else word.upper() for word, ok in readings)

    for name, rare in (("plain", False), ("rare", True)):
        idx = [k for k, r in enumerate(rows) if (r["concept"] != NONE_CONCEPT) == rare]
        if not idx:
            continue
        titles = [f"{rows[k]['prompt'].removeprefix('a ')}\n→ {title(rows[k])}" for k in idx]
        titled_grid(
            images[idx],
            titles,
            run_dir / f"fidelity_{name}.png",
            ncol=8,
            suptitle=f"{name} prompts: reader's reading under each prompt (CAPITALS = wrong)",
            cell_inches=1.9,
        )
