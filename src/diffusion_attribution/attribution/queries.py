"""Attribution queries: the images whose training-data sources we want.

A query is either generated (prompt + seed, with the model: the image and its final latent are kept)
or given (an image file + its caption). Either may carry a box or a mask that restricts unlearning to
a region. Sources, in the `query` config:

    query.prompts=[...] query.seeds=[...]            generated with the model
    query.images=[a.png, ...] query.captions=[...]   existing images
    query.file=queries.jsonl                          one JSON object per line, with either
        {"prompt": ..., "seed": ...} or {"image": path, "caption": ...}, and optionally
        "box": [x0, y0, x1, y1] (pixels of the model's resolution), "mask": path to an image,
        "relevant_ids": [...] (ground truth for evaluation), "concept": a metadata concept.
    query.boxes / query.masks: per-query lists aligned with the prompts+images above.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError

from diffusion_attribution.data.base import image_to_tensor, to_rgb
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.models.sampling import generate


class QueryError(ValueError):
    """A query that cannot be attributed as given; the message says how to fix it."""


@dataclass
class Query:
    caption: str
    image: torch.Tensor  # [3, H, W] in [-1, 1] at the model's resolution
    latent: torch.Tensor  # the UNet's input space: the final sampler latent, or the encoded image
    mask: torch.Tensor | None = None  # [H, W] in {0, 1} at image resolution; None = whole image
    source: dict[str, Any] = field(default_factory=dict)  # prompt/seed or image path, box, ...

    def record(self) -> dict[str, Any]:
        """What ranking.json says about the query."""
        return {"caption": self.caption, **self.source}


def _listify(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, DictConfig) or OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (str, int, float)):
        return [value]
    return list(value)


def read_query_file(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise QueryError(f"query.file={path} does not exist: give a JSONL file with one query per line.")
    entries = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise QueryError(f"{path}:{line_no} is not valid JSON ({err.msg}).") from err
        if not isinstance(entry, dict) or not (
            {"prompt"} <= entry.keys() or {"image", "caption"} <= entry.keys()
        ):
            raise QueryError(
                f'{path}:{line_no}: each line needs either "prompt" (and optionally "seed") or both '
                '"image" and "caption".'
            )
        if "image" in entry and not Path(entry["image"]).is_absolute():
            entry["image"] = str(path.parent / entry["image"])
        if isinstance(entry.get("mask"), str) and not Path(entry["mask"]).is_absolute():
            entry["mask"] = str(path.parent / entry["mask"])
        entries.append(entry)
    return entries


def query_seed(value: Any, where: str) -> int:
    """A sampling seed: a non-negative integer (not a bool, not a fraction, not a word)."""
    try:
        if isinstance(value, bool) or float(value) != int(float(value)) or int(float(value)) < 0:
            raise ValueError
        return int(float(value))
    except (TypeError, ValueError):
        raise QueryError(
            f"{where} is {value!r}, not a sampling seed: give non-negative integers, e.g. query.seeds='[0,1]'."
        ) from None


def query_specs(cfg: DictConfig) -> list[dict[str, Any]]:
    """The `query` config as a list of plain dicts (prompt queries first, then image queries)."""
    prompts, seeds = _listify(cfg.get("prompts")), _listify(cfg.get("seeds"))
    images, captions = _listify(cfg.get("images")), _listify(cfg.get("captions"))
    if seeds and len(seeds) != len(prompts):
        raise QueryError(
            f"query.prompts has {len(prompts)} entries but query.seeds has {len(seeds)}: give one seed per "
            "prompt, or no seeds (then seed 0 for all)."
        )
    if len(images) != len(captions):
        raise QueryError(
            f"query.images has {len(images)} entries but query.captions has {len(captions)}: every image "
            "query needs its caption."
        )
    specs: list[dict[str, Any]] = [
        {"prompt": str(p), "seed": query_seed(seeds[k], f"query.seeds entry {k}") if seeds else 0}
        for k, p in enumerate(prompts)
    ]
    specs += [{"image": str(i), "caption": str(c)} for i, c in zip(images, captions, strict=True)]
    for key in ("boxes", "masks", "relevant_ids", "concepts"):
        values = _listify(cfg.get(key))
        if values and len(values) != len(specs):
            raise QueryError(
                f"query.{key} has {len(values)} entries for {len(specs)} prompt+image queries: give one per "
                "query (null where none)."
            )
        for spec, value in zip(specs, values, strict=False):
            if value is not None:
                spec[{"boxes": "box", "masks": "mask", "concepts": "concept"}.get(key, key)] = value
    if cfg.get("file"):
        specs += read_query_file(cfg.file)
    if not specs:
        raise QueryError(
            "No queries: give query.prompts=[...] (with query.seeds=[...]), query.images=[...] with "
            "query.captions=[...], or query.file=<queries.jsonl>."
        )
    return specs


def load_query_image(path: str | Path, resolution: int) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise QueryError(f"Query image {path} does not exist.")
    try:
        with Image.open(path) as image:
            image.load()
            rgb = to_rgb(image)  # 16-bit and transparent images converted as training images are
    except (UnidentifiedImageError, OSError) as err:
        raise QueryError(f"Query image {path} cannot be read ({err}); give a PNG or JPEG file.") from err
    if rgb.size != (resolution, resolution):
        raise QueryError(
            f"Query image {path} is {rgb.size[0]}x{rgb.size[1]} but the model works at {resolution}x{resolution}: "
            "resize or crop it to that size first (attribution must see the pixels the model would make)."
        )
    return image_to_tensor(rgb)


def build_mask(spec: dict[str, Any], resolution: int) -> torch.Tensor | None:
    """A box [x0, y0, x1, y1] (pixels, end-exclusive) or a mask image -> [H, W] float in {0, 1}."""
    if spec.get("box") is not None and spec.get("mask") is not None:
        raise QueryError("A query has both a box and a mask: give one of them.")
    if spec.get("box") is not None:
        box = [int(v) for v in _listify(spec["box"])]
        if len(box) != 4:
            raise QueryError(f"Box {box} must be [x0, y0, x1, y1] in pixels.")
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= resolution and 0 <= y0 < y1 <= resolution):
            raise QueryError(
                f"Box {box} is empty or outside the {resolution}x{resolution} image: need "
                f"0 <= x0 < x1 <= {resolution} and 0 <= y0 < y1 <= {resolution}."
            )
        mask = torch.zeros(resolution, resolution)
        mask[y0:y1, x0:x1] = 1.0
        return mask
    if spec.get("mask") is not None:
        path = Path(spec["mask"])
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
            raise QueryError(f"Mask {path} cannot be read ({err}); give a greyscale PNG.") from err
        if array.shape != (resolution, resolution):
            raise QueryError(
                f"Mask {path} is {array.shape[1]}x{array.shape[0]} but queries are {resolution}x{resolution}: "
                "give a mask of the query image's size."
            )
        mask = torch.from_numpy((array > 0.5).astype(np.float32))
        if mask.sum() == 0:
            raise QueryError(f"Mask {path} is empty (no pixel > 0.5): mark the region to attribute in white.")
        return mask
    return None


def build_queries(
    cfg: DictConfig,
    model: TextToImageModel,
    out_dir: str | Path | None = None,
    num_steps: int = 30,
    guidance_scale: float = 3.0,
    sampler: str = "ddim",
) -> list[Query]:
    """Every query with its image and latent; generated ones are saved (PNG + latent) in `out_dir`."""
    specs = query_specs(cfg)
    resolution = model.image_resolution
    # Validate every mask and read every image before sampling: a bad query fails fast, not after
    # the generation of the others has been paid for.
    masks = [build_mask(spec, resolution) for spec in specs]
    images = {
        n: load_query_image(spec["image"], resolution) for n, spec in enumerate(specs) if "image" in spec
    }
    prompt_specs = [s for s in specs if "prompt" in s]
    generated = None
    if prompt_specs:
        generated = generate(
            model,
            [s["prompt"] for s in prompt_specs],
            [query_seed(s.get("seed", 0), f"the seed of query {s.get('prompt')!r}") for s in prompt_specs],
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
        )
    queries: list[Query] = []
    g = 0
    for n, (spec, mask) in enumerate(zip(specs, masks, strict=True)):
        source = {k: v for k, v in spec.items() if k not in ("caption",)}
        if "prompt" in spec:
            assert generated is not None
            image, latent = generated.images[g].cpu(), generated.latents[g].cpu()
            source.update({"sampler": sampler, "num_steps": num_steps, "guidance_scale": guidance_scale})
            g += 1
            caption = spec["prompt"]
        else:
            image = images[n]
            with torch.no_grad():
                latent = model.encode_images(image[None].to(model.device))[0].cpu()
            caption = spec["caption"]
        queries.append(Query(caption, image, latent, mask, source))
    if out_dir is not None:
        save_queries(queries, out_dir)
    return queries


def save_queries(queries: Sequence[Query], out_dir: str | Path) -> None:
    from safetensors.torch import save_file

    from diffusion_attribution.data.base import tensor_to_image

    out = Path(out_dir) / "queries"
    out.mkdir(parents=True, exist_ok=True)
    for k, q in enumerate(queries):
        tensor_to_image(q.image).save(out / f"query_{k:03d}.png")
        # clone: for a pixel-space model an image query's latent is the image tensor itself, and
        # safetensors refuses to save two entries that share memory.
        tensors = {"latent": q.latent.clone().contiguous(), "image": q.image.clone().contiguous()}
        if q.mask is not None:
            tensors["mask"] = q.mask.contiguous()
        save_file(tensors, out / f"query_{k:03d}.safetensors")
        q.source["saved_image"] = str(out / f"query_{k:03d}.png")
