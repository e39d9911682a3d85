"""One base for every captioned-image data set: stable ids, exclusions, flips, explicit access.

Contract (DESIGN.md): an example's id is its position in the source's canonical order. Excluding ids
never renumbers the others; score arrays and rankings always have one entry per id of the source.

Every image reaches the model through `to_rgb`: 16-bit images are scaled to 8 bits (value / 257,
rounded) rather than clipped, and transparent images (RGBA, LA, PA, P or L/RGB with a transparency
key) are composited onto a white background (`ALPHA_BACKGROUND`), never onto whatever colour the
transparent pixels happen to store.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset


class DataError(ValueError):
    """Bad input data: the message names the file or id and says how to fix it."""


ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": 16-bit PNG/TIFF data in older Pillow


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded PIL image -> 8-bit RGB, correctly for 16-bit and transparent images.

    16-bit single-channel images (I;16*, and I holding 16-bit data) are scaled to 8 bits by value / 257,
    rounded (PIL's own convert("RGB") clips them, turning every value above 255 white). Images with
    an alpha channel or a transparency key are composited onto ALPHA_BACKGROUND (white).
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image.convert("RGB")  # a copy, as every other branch returns: callers may close `image`
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        key = image.info.get("transparency")
        gray = np.clip(np.rint(np.clip(values, 0, 65535) / 257.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(gray, "L")
        if isinstance(key, int):  # a 16-bit grey value that means "transparent"
            alpha = np.where(values == key, 0, 255).astype(np.uint8)
            image = Image.merge("LA", (image, Image.fromarray(alpha, "L")))
        else:
            return image.convert("RGB")
    if _has_alpha(image):
        rgba = image.convert("RGBA")  # P/L/RGB transparency keys become an alpha channel here
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class CaptionedImageSource(ABC):
    """Random access to captioned images in canonical order (id = position)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def captions(self, idx: int) -> list[str]:
        """All captions of example `idx` (at least one)."""

    @abstractmethod
    def load_image(self, idx: int) -> Image.Image:
        """The example's image as RGB, before resizing."""

    @abstractmethod
    def file_name(self, idx: int) -> str:
        """Where the image lives (relative to the data root), for rankings and error messages."""

    def metadata(self, idx: int) -> dict[str, Any]:
        """Attributes known for the example (the synthetic world records colour, shape, concept...)."""
        return {}

    def all_captions(self) -> list[str]:
        return [c for i in range(len(self)) for c in self.captions(i)]

    def content_key(self) -> str:
        """What identifies the pixels beyond file names and captions ("" when they say it all): caches
        keyed by the data must not be reused for other images under the same names."""
        return ""


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Centre crop to a square, then resize (bicubic, antialiased) to `resolution`."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.BICUBIC, reducing_gap=None)
    return image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float tensor [3, H, W] in [-1, 1] (through `to_rgb`)."""
    array = np.asarray(to_rgb(image), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """Float tensor [3, H, W] in [-1, 1] -> PIL RGB."""
    array = ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def _read_id_file(path: Path, source: str, what: str) -> list[Any]:
    """The raw entries of an id file (.npy, .json, else text with one id per line); a file that cannot
    be read as such is a DataError naming it and saying how to write a valid one."""
    if path.suffix == ".npy":
        fix = f"Rewrite it with numpy.save('{path}', numpy.asarray(ids, dtype=numpy.int64))."
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:  # truncated, corrupt, or pickled objects
            raise DataError(
                f"{source} is not a readable .npy integer array ({error}); it may be truncated or corrupt. "
                + fix
            ) from None
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "iu" or array.ndim > 1:
            kind = (
                type(array).__name__ if not isinstance(array, np.ndarray) else f"{array.dtype} {array.shape}"
            )
            raise DataError(
                f"{source} holds a {kind} array; {what} needs a 1-D integer array of example ids. " + fix
            )
        return array.reshape(-1).tolist()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{source} is not a text file ({error}). Give ids one per line (.txt), as a JSON list "
            "(.json) or as an integer array (.npy)."
        ) from None
    if path.suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{source} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}). "
                "Write the ids as one JSON list, e.g. [3, 17, 42]."
            ) from None
        if not isinstance(raw, list):
            raise DataError(
                f"{source} holds a JSON {type(raw).__name__}, not a list. Write the ids as one JSON list, "
                "e.g. [3, 17, 42]."
            )
        return raw
    return [line.strip() for line in text.splitlines() if line.strip()]


def parse_id_list(spec: Any, num_examples: int, what: str = "data.exclude") -> np.ndarray:
    """Read a list of example ids given inline (a list, or one int such as Hydra's `data.exclude=3`)
    or as a file (.txt one per line, .json, .npy).

    Every id must be an integer in [0, num_examples); duplicates are allowed and collapsed.
    """
    if spec is None or (isinstance(spec, str) and spec.strip() == ""):
        return np.zeros(0, dtype=np.int64)
    source = what
    if isinstance(spec, (bool, np.bool_)):
        raise DataError(
            f"{what} is {spec!r}, not an id list. Give an id (e.g. {what}=3), a list of ids "
            f"(e.g. {what}='[3,17]') or a file of ids (.txt, .json, .npy)."
        )
    if isinstance(spec, (int, float, np.integer, np.floating)):
        spec = [spec]  # one id; a non-integer one is reported below like any bad entry
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        source = f"{what} file {path}"
        if not path.is_file():
            raise DataError(
                f"{source} does not exist. Give a list of ids (e.g. {what}='[3,17]') or a file with "
                "one integer id per line (.txt), a JSON list (.json) or an integer array (.npy)."
            )
        raw: Sequence[Any] = _read_id_file(path, source, what)
    else:
        raw = list(spec)
    ids = []
    for position, value in enumerate(raw):
        try:
            if isinstance(value, (bool, np.bool_)):  # float(True) == 1.0 would pass as id 1
                raise ValueError
            as_float = float(value)
            if not as_float.is_integer():
                raise ValueError
            ids.append(int(as_float))
        except (TypeError, ValueError):
            raise DataError(
                f"{source}: entry {position} is {value!r}, not an integer id. Ids are the examples' "
                "positions in the data set's canonical order (0-based integers), not file names or "
                "data-set specific ids such as COCO image ids."
            ) from None
    ids_array = np.asarray(sorted(set(ids)), dtype=np.int64)
    bad = ids_array[(ids_array < 0) | (ids_array >= num_examples)]
    if len(bad):
        raise DataError(
            f"{source}: ids {bad[:10].tolist()} are out of range; this data set has {num_examples} "
            f"examples, so valid ids are 0..{num_examples - 1} (positions in its canonical order, not "
            "data-set specific ids such as COCO image ids)."
        )
    return ids_array


class CaptionedImageDataset(Dataset):
    """Training view of a source: the kept ids, resized tensors, a random caption and optional flip.

    Images are decoded once and kept as uint8 (the sets this runs on in memory are small); an
    explicit `example(id, caption_index, flip)` gives the deterministic access that per-sample
    losses need.
    """

    def __init__(
        self,
        source: CaptionedImageSource,
        resolution: int,
        ids: np.ndarray | None = None,
        random_flip: bool = False,
        cache_images: bool = True,
    ) -> None:
        self.source = source
        self.resolution = resolution
        self.ids = np.arange(len(source)) if ids is None else np.asarray(ids, dtype=np.int64)
        self.random_flip = random_flip
        self.cache_images = cache_images
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def image_tensor(self, idx: int) -> torch.Tensor:
        """Example `idx` (a source id) as uint8 [3, R, R]."""
        cached = self._cache.get(idx)
        if cached is not None:
            return cached
        try:
            image = self.source.load_image(idx)
        except DataError:
            raise
        except Exception as error:  # PIL raises many types for unreadable files
            raise DataError(
                f"Cannot read the image of example {idx} ({self.source.file_name(idx)}): {error}. "
                "Replace or remove the file, or exclude the id with data.exclude."
            ) from error
        image = center_crop_resize(to_rgb(image), self.resolution)
        tensor = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        if self.cache_images:
            self._cache[idx] = tensor
        return tensor

    def example(self, idx: int, caption_index: int = 0, flip: bool = False) -> dict[str, Any]:
        captions = self.source.captions(idx)
        pixels = self.image_tensor(idx).float() / 127.5 - 1.0
        if flip:
            pixels = pixels.flip(-1)
        return {
            "id": idx,
            "pixel_values": pixels,
            "caption": captions[caption_index % len(captions)],
            "caption_index": caption_index % len(captions),
            "flip": flip,
        }

    def __getitem__(self, position: int) -> dict[str, Any]:
        idx = int(self.ids[position])
        num_captions = len(self.source.captions(idx))
        caption_index = int(torch.randint(num_captions, ()).item())
        flip = bool(self.random_flip and torch.rand(()).item() < 0.5)
        return self.example(idx, caption_index, flip)


def collate_examples(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": torch.tensor([b["id"] for b in batch], dtype=torch.long),
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "caption": [b["caption"] for b in batch],
        "caption_index": torch.tensor([b["caption_index"] for b in batch], dtype=torch.long),
        "flip": torch.tensor([b["flip"] for b in batch], dtype=torch.bool),
    }


class CaptionedImageDataModule(pl.LightningDataModule):
    """Base datamodule: subclasses only say how to build their source (`build_source`)."""

    def __init__(
        self,
        resolution: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        random_flip: bool = False,
        exclude: Any = None,
        cache_images: bool = True,
        sample_prompts: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.sample_prompts = list(sample_prompts or [])
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.random_flip = random_flip
        self.exclude_spec = exclude
        self.cache_images = cache_images
        self._source: CaptionedImageSource | None = None
        self._dataset: CaptionedImageDataset | None = None

    def build_source(self) -> CaptionedImageSource:
        raise NotImplementedError

    @property
    def source(self) -> CaptionedImageSource:
        if self._source is None:
            self._source = self.build_source()
        return self._source

    @property
    def num_examples(self) -> int:
        """Size of the full data set (ids range), exclusions included."""
        return len(self.source)

    @property
    def excluded_ids(self) -> np.ndarray:
        return parse_id_list(self.exclude_spec, len(self.source))

    @property
    def train_ids(self) -> np.ndarray:
        """Ids that training sees: every id not excluded, in canonical order."""
        keep = np.ones(len(self.source), dtype=bool)
        keep[self.excluded_ids] = False
        return np.flatnonzero(keep)

    @property
    def dataset(self) -> CaptionedImageDataset:
        if self._dataset is None:
            self._dataset = CaptionedImageDataset(
                self.source, self.resolution, self.train_ids, self.random_flip, self.cache_images
            )
        return self._dataset

    def full_dataset(self) -> CaptionedImageDataset:
        """Every id (no exclusion, no random flip): what attribution scores."""
        return CaptionedImageDataset(self.source, self.resolution, None, False, self.cache_images)

    def setup(self, stage: str | None = None) -> None:
        if len(self.dataset) == 0:
            raise DataError("Every example is excluded: data.exclude removes the whole data set.")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=min(self.batch_size, len(self.dataset)),
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            collate_fn=collate_examples,
            persistent_workers=self.num_workers > 0,
        )
