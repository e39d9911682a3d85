"""`data=abc`: the released AbC benchmark (Wang et al., ICCV 2023) read by path, and the candidate pool
every AbC-style benchmark ranks: distractor images first (ids 0..N-1), then the exemplars.

The released layout under `data.root` (the GenDataAttribution data set):

    json/<test_case>.json     one entry per customized model: {"exemplar": [paths], "synth": {prompt
                              type: [paths]}, "class_id": ..., "category": ...}; paths start with
                              "dataset/" (the repository's folder) and are resolved under data.root
    exemplar/<set>/...        the exemplar images (set: imagenet, bamfg, artchive)
    synth/<set>/...           the images the customized models generated (the queries)
    models/<set>/<class_id>/  per customized model: `<new1>.bin` (the token's embedding, a
                              {token: vector} dict) and `pytorch_custom_diffusion_weights.pt` (the
                              UNet's cross-attention K/V weights)

A customized model is Stable Diffusion 1.4 (a local diffusers folder) with the token added and the K/V
weights loaded strictly (models/customization.py `apply_abc_customization`, `model=custom_diffusion`). Weight files are read
only with `torch.load(weights_only=True)`. The pool (`data.pool`) is followed by the entry's exemplars,
each captioned with the model's training prompt ("<new1> <category>" for objects, "A picture in the
style of <new1> art" for styles, as the paper's tasks; `data.train_prompt` overrides).

The pool folder is read in either of two layouts:

    released LAION subset   <pool>/images/ (the image files) and <pool>/captions.txt: the images sorted
                            by file name (files with an image extension, IMAGE_EXTENSIONS), line k of
                            captions.txt the caption of the k-th image. Used when the folder has no
                            metadata file (and data.pool_metadata is null).
    image folder            metadata.jsonl/csv with file_name and text (data=folder's convention);
                            data.pool_metadata names another metadata file.

`data.pool_size` keeps the first N pool images (ids 0..N-1); upstream evaluates on the first 100,000
of the LAION subset, so data.pool_size=100000 reproduces its pool. null keeps them all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from diffusion_attribution.data.base import (
    CaptionedImageDataModule,
    CaptionedImageSource,
    DataError,
)
from diffusion_attribution.data.folder import (
    METADATA_NAMES,
    ImageFolderSource,
    content_key_of_files,
    open_rgb,
)

OBJECT_SETS = ("imagenet",)  # the other sets (bamfg, artchive) are artistic styles
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
UPSTREAM_POOL_SIZE = 100_000  # the released LAION subset's first 100k images, as upstream evaluates


# ------------------------------------------------------------------------------------------ pool
class ExemplarSource(CaptionedImageSource):
    """Image files with given captions (one caption list per file, or one list for all)."""

    def __init__(
        self,
        files: Sequence[str | Path],
        captions: Sequence[str] | Sequence[list[str]],
        root: str | Path = ".",
    ) -> None:
        self.root = Path(root)
        self.files = [Path(f) for f in files]
        missing = [str(f) for f in self.files if not (self.root / f).is_file()]
        if missing:
            raise DataError(f"Exemplar image(s) not found: {', '.join(missing[:10])}.")
        if captions and isinstance(captions[0], str):
            self._captions = [list(captions)] * len(self.files)  # type: ignore[list-item]
        else:
            self._captions = [list(c) for c in captions]  # type: ignore[arg-type]
        if len(self._captions) != len(self.files):
            raise DataError(f"{len(self.files)} exemplars but {len(self._captions)} caption lists.")

    def __len__(self) -> int:
        return len(self.files)

    def captions(self, idx: int) -> list[str]:
        return self._captions[idx]

    def load_image(self, idx: int) -> Image.Image:
        return open_rgb(self.root / self.files[idx])

    def file_name(self, idx: int) -> str:
        return str(self.files[idx])

    def metadata(self, idx: int) -> dict[str, Any]:
        return {"exemplar": True}

    def content_key(self) -> str:
        return content_key_of_files(self.root, [str(f) for f in self.files])


class CaptionsTxtPoolSource(CaptionedImageSource):
    """The released LAION subset as is: `<root>/images/` sorted by name, line k of `<root>/captions.txt`
    the caption of image k; `limit` keeps the first images only (module docstring)."""

    def __init__(self, root: str | Path, limit: int | None = None) -> None:
        self.root = Path(root).expanduser()
        image_dir, captions_path = self.root / "images", self.root / "captions.txt"
        if not image_dir.is_dir() or not captions_path.is_file():
            raise DataError(
                f"{self.root} is not a released pool folder: it needs images/ and captions.txt (one caption "
                "per line, in sorted image order), or a metadata.jsonl/csv (give its name with "
                "data.pool_metadata=<name>)."
            )
        names = sorted(
            p.name
            for p in image_dir.iterdir()
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
        )
        try:
            captions = captions_path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise DataError(
                f"{captions_path} is not UTF-8 text ({error}). Re-save it as UTF-8, one caption per line."
            ) from None
        if limit is not None:
            if limit <= 0 or limit > len(names):
                raise DataError(
                    f"data.pool_size={limit}, but {image_dir} has {len(names)} images. Give a size in "
                    f"1..{len(names)} (upstream uses {UPSTREAM_POOL_SIZE}), or null for every image."
                )
            if len(captions) < limit:
                raise DataError(
                    f"{captions_path} has {len(captions)} lines, fewer than data.pool_size={limit} images: "
                    "line k must be the caption of the k-th image (sorted by file name). Complete the "
                    "file or lower data.pool_size."
                )
            names = names[:limit]
        elif len(captions) != len(names):
            raise DataError(
                f"{captions_path} has {len(captions)} lines but {image_dir} has {len(names)} images: line k "
                "must be the caption of the k-th image sorted by file name. Restore the missing images "
                f"or captions, or keep the first N with data.pool_size=N (upstream: {UPSTREAM_POOL_SIZE})."
            )
        if not names:
            raise DataError(f"{image_dir} has no image files ({', '.join(IMAGE_EXTENSIONS)}).")
        self.file_names = [f"images/{name}" for name in names]
        self._captions = [c.strip() for c in captions[: len(names)]]
        empty = [k + 1 for k, c in enumerate(self._captions) if not c]
        if empty:
            raise DataError(
                f"{captions_path} has empty captions on line(s) {empty[:10]}: give every image a caption "
                "(line k is the caption of the k-th image sorted by file name)."
            )

    def __len__(self) -> int:
        return len(self.file_names)

    def captions(self, idx: int) -> list[str]:
        return [self._captions[idx]]

    def load_image(self, idx: int) -> Image.Image:
        return open_rgb(self.root / self.file_names[idx])

    def file_name(self, idx: int) -> str:
        return self.file_names[idx]

    def content_key(self) -> str:
        return content_key_of_files(self.root, self.file_names)


class FirstSource(CaptionedImageSource):
    """The first `count` examples of a source (ids unchanged)."""

    def __init__(self, source: CaptionedImageSource, count: int, what: str = "data.pool_size") -> None:
        if not 0 < count <= len(source):
            raise DataError(
                f"{what}={count}, but the pool has {len(source)} images: give a size in 1..{len(source)}, "
                "or null for every image."
            )
        self.source, self.count = source, count

    def __len__(self) -> int:
        return self.count

    def captions(self, idx: int) -> list[str]:
        return self.source.captions(idx)

    def load_image(self, idx: int) -> Image.Image:
        return self.source.load_image(idx)

    def file_name(self, idx: int) -> str:
        return self.source.file_name(idx)

    def metadata(self, idx: int) -> dict[str, Any]:
        return self.source.metadata(idx)

    def content_key(self) -> str:
        if isinstance(self.source, ImageFolderSource):
            return content_key_of_files(self.source.root, self.source.file_names[: self.count])
        return f"first {self.count} of {self.source.content_key()}"


def build_pool_source(
    pool: str | Path, pool_metadata: str | None = None, pool_size: int | None = None
) -> CaptionedImageSource:
    """The distractor pool in either layout (module docstring), limited to its first `pool_size` images."""
    folder = Path(pool).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"Pool folder {folder} (data.pool) does not exist. Pass the distractor image folder: the "
            "released LAION subset (images/ + captions.txt) or a folder with metadata.jsonl/csv."
        )
    has_metadata = any((folder / name).is_file() for name in METADATA_NAMES)
    if pool_metadata is None and not has_metadata and (folder / "captions.txt").is_file():
        return CaptionsTxtPoolSource(folder, pool_size)
    if pool_metadata is None and not has_metadata:
        raise DataError(
            f"Pool folder {folder} (data.pool) has neither captions.txt with images/ (the released LAION "
            f"subset) nor {' or '.join(METADATA_NAMES)}; give one, or name the metadata file with "
            "data.pool_metadata=<name>."
        )
    source: CaptionedImageSource = ImageFolderSource(
        folder, pool_metadata, root_key="data.pool", metadata_key="data.pool_metadata"
    )
    return source if pool_size is None else FirstSource(source, int(pool_size))


class PoolWithExemplarsSource(CaptionedImageSource):
    """Distractors (ids 0..N-1, their own ids unchanged) followed by the exemplars (ids N..N+E-1)."""

    def __init__(self, distractors: CaptionedImageSource, exemplars: CaptionedImageSource) -> None:
        if len(exemplars) == 0:
            raise DataError("The concept has no exemplars: nothing for attribution to find.")
        self.distractors = distractors
        self.exemplars = exemplars
        self.num_distractors = len(distractors)

    @property
    def exemplar_ids(self) -> list[int]:
        return list(range(self.num_distractors, self.num_distractors + len(self.exemplars)))

    def _part(self, idx: int) -> tuple[CaptionedImageSource, int]:
        if not 0 <= idx < len(self):
            raise IndexError(f"Id {idx} is outside the pool (0..{len(self) - 1}).")
        if idx < self.num_distractors:
            return self.distractors, idx
        return self.exemplars, idx - self.num_distractors

    def __len__(self) -> int:
        return self.num_distractors + len(self.exemplars)

    def captions(self, idx: int) -> list[str]:
        source, k = self._part(idx)
        return source.captions(k)

    def load_image(self, idx: int) -> Image.Image:
        source, k = self._part(idx)
        return source.load_image(k)

    def file_name(self, idx: int) -> str:
        source, k = self._part(idx)
        return source.file_name(k) if source is self.distractors else f"exemplars/{source.file_name(k)}"

    def metadata(self, idx: int) -> dict[str, Any]:
        source, k = self._part(idx)
        return {**source.metadata(k), "exemplar": source is self.exemplars}

    def content_key(self) -> str:
        return f"{self.distractors.content_key()}+{self.exemplars.content_key()}"


# ------------------------------------------------------------------------------------------ AbC layout
@dataclass
class AbcEntry:
    """One customized model of the released benchmark."""

    root: Path
    test_case: str
    index: int
    class_id: str
    category: str | None
    image_set: str
    exemplars: list[Path]
    synth: dict[str, list[Path]] = field(default_factory=dict)
    model_dir: Path | None = None
    train_prompt: str = ""

    @property
    def concept_type(self) -> str:
        return "object" if self.image_set in OBJECT_SETS else "style"


def resolve_released_path(root: Path, path: str) -> Path:
    """A path as written in the released JSON ("dataset/exemplar/...") -> under data.root."""
    parts = Path(path).parts
    if parts and parts[0] == "dataset":
        parts = parts[1:]
    return root.joinpath(*parts)


def _image_set(path: str) -> str:
    """The exemplar set a released path belongs to: exemplar/<set>/... (imagenet, bamfg, artchive)."""
    parts = Path(path).parts
    return parts[parts.index("exemplar") + 1] if "exemplar" in parts[:-1] else "unknown"


def default_train_prompt(entry_category: str | None, concept_type: str) -> str:
    if concept_type == "style" or not entry_category:
        return "A picture in the style of <new1> art"
    return f"<new1> {entry_category}"


def read_abc_entry(
    root: str | Path,
    test_case: str,
    index: int,
    model_dir: str | Path | None = None,
    train_prompt: str | None = None,
) -> AbcEntry:
    root = Path(root).expanduser()
    listing = root / "json" / f"{test_case}.json"
    if not listing.is_file():
        raise DataError(
            f"{listing} does not exist: data.root must hold the AbC release (json/, exemplar/, synth/, "
            "models/) and data.test_case one of its json/<test_case>.json files (e.g. test_bamfg)."
        )
    try:
        entries = json.loads(listing.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{listing} is not valid JSON ({error}).") from error
    if not isinstance(entries, list) or not 0 <= index < len(entries):
        raise DataError(
            f"{listing} has {len(entries) if isinstance(entries, list) else 'no'} entries; data.index={index}."
        )
    raw = entries[index]
    for key in ("exemplar", "class_id"):
        if key not in raw:
            raise DataError(f"{listing} entry {index} has no {key!r} field.")
    exemplars = [resolve_released_path(root, p) for p in raw["exemplar"]]
    missing = [str(p) for p in exemplars if not p.is_file()]
    if missing:
        raise DataError(
            f"Exemplar image(s) listed in {listing} entry {index} do not exist: {', '.join(missing)}."
        )
    image_set = _image_set(raw["exemplar"][0]) if raw["exemplar"] else "unknown"
    synth = {k: [resolve_released_path(root, p) for p in v] for k, v in (raw.get("synth") or {}).items()}
    class_id = str(raw["class_id"])
    directory = Path(model_dir) if model_dir else root / "models" / image_set / class_id
    entry = AbcEntry(
        root, test_case, index, class_id, raw.get("category"), image_set, exemplars, synth, directory
    )
    entry.train_prompt = train_prompt or default_train_prompt(entry.category, entry.concept_type)
    return entry


def query_records(
    entry: AbcEntry, prompts_file: str | Path, relevant_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """attribute.py query lines (image + caption + ground truth) for the entry's generated images.

    `prompts_file` gives each synthesized image's prompt: a list of task records with
    `synth_image_path` and `prompt` (and `test_case`, `test_case_ind` to select the entry), or a
    {synth image path: prompt} mapping. Paths are relative to data.root (a leading "dataset/" or
    "synth/" prefix is accepted)."""
    prompts_file = Path(prompts_file)
    if not prompts_file.is_file():
        raise DataError(f"{prompts_file} does not exist: give the JSON of the synthesized images' prompts.")
    raw = json.loads(prompts_file.read_text())
    mine = {str(p.resolve()) for paths in entry.synth.values() for p in paths}
    pairs: list[tuple[Path, str]] = []
    if isinstance(raw, dict):
        pairs = [(resolve_released_path(entry.root, k), str(v)) for k, v in raw.items()]
    elif isinstance(raw, list):
        for task in raw:
            if task.get("test_case", entry.test_case) != entry.test_case:
                continue
            if int(task.get("test_case_ind", entry.index)) != entry.index:
                continue
            pairs.append((resolve_released_path(entry.root, task["synth_image_path"]), str(task["prompt"])))
    else:
        raise DataError(f"{prompts_file} must be a list of task records or a {{path: prompt}} mapping.")
    records = []
    for path, prompt in pairs:
        if mine and str(path.resolve()) not in mine:
            continue
        if not path.is_file():
            raise DataError(f"Query image {path} (from {prompts_file}) does not exist.")
        records.append(
            {
                "image": str(path),
                "caption": prompt,
                "relevant_ids": [int(i) for i in relevant_ids],
                "concept": entry.class_id,
                "concept_type": entry.concept_type,
            }
        )
    if not records:
        raise DataError(
            f"{prompts_file} names no synthesized image of {entry.test_case} entry {entry.index}."
        )
    return records


class AbcDataModule(CaptionedImageDataModule):
    """`data=abc`: the pool folder (ids 0..N-1) followed by one AbC model's exemplars."""

    def __init__(
        self,
        root: str,
        test_case: str,
        index: int = 0,
        pool: str | None = None,
        pool_metadata: str | None = None,
        model_dir: str | None = None,
        train_prompt: str | None = None,
        pool_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root, self.test_case, self.index = root, test_case, int(index)
        self.pool, self.pool_metadata = pool, pool_metadata
        self.pool_size = None if pool_size is None else int(pool_size)
        self.model_dir, self.train_prompt = model_dir, train_prompt

    @property
    def entry(self) -> AbcEntry:
        return read_abc_entry(self.root, self.test_case, self.index, self.model_dir, self.train_prompt)

    def build_source(self) -> PoolWithExemplarsSource:
        if not self.pool:
            raise DataError(
                "data=abc needs data.pool=<folder>: the distractor images, e.g. the released LAION subset "
                "(a folder with images/ and captions.txt) or a folder with metadata.jsonl/csv."
            )
        entry = self.entry
        exemplars = ExemplarSource(entry.exemplars, [entry.train_prompt])
        pool = build_pool_source(self.pool, self.pool_metadata, self.pool_size)
        return PoolWithExemplarsSource(pool, exemplars)

    @property
    def exemplar_ids(self) -> list[int]:
        return self.source.exemplar_ids  # type: ignore[attr-defined]

    def write_queries(self, prompts_file: str | Path, out: str | Path) -> Path:
        """A query.file for attribute.py: every synthesized image of this model with its ground truth."""
        records = query_records(self.entry, prompts_file, self.exemplar_ids)
        out = Path(out)
        out.write_text("".join(json.dumps(r) + "\n" for r in records))
        return out


def main(argv: Sequence[str] | None = None) -> None:
    """python -m diffusion_attribution.data.abc --root R --test-case T --index I --pool P --prompts F --out Q"""
    import argparse

    parser = argparse.ArgumentParser(description="Write an attribute.py query file for one AbC model.")
    parser.add_argument("--root", required=True)
    parser.add_argument("--test-case", required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--pool", required=True)
    parser.add_argument(
        "--pool-size", type=int, default=None, help=f"first N pool images (upstream: {UPSTREAM_POOL_SIZE})"
    )
    parser.add_argument("--prompts", required=True, help="tasks JSON or {synth path: prompt} JSON")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    datamodule = AbcDataModule(
        args.root, args.test_case, args.index, pool=args.pool, pool_size=args.pool_size
    )
    print(datamodule.write_queries(args.prompts, args.out))


if __name__ == "__main__":
    main()
