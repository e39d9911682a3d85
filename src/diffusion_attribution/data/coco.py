"""`data=coco`: MS-COCO 2017 captions in the official layout.

    <root>/annotations/captions_train2017.json   {"images": [{id, file_name, ...}],
                                                   "annotations": [{image_id, id, caption}]}
    <root>/train2017/<file_name>

Canonical order is by COCO image id (after the optional subset filter), so ids do not depend on the
order of the JSON file; an image's captions are its annotations sorted by annotation id.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from diffusion_attribution.data.base import CaptionedImageDataModule, CaptionedImageSource, DataError
from diffusion_attribution.data.folder import MAX_LISTED, check_files_exist, open_rgb

DOWNLOAD_PAGE = "https://cocodataset.org/#download"


def read_coco_ids(spec: str | Path | Sequence[Any]) -> list[int]:
    """COCO image ids given inline or as a file (one id per line, or a JSON list)."""
    where = "data.subset"
    raw: Sequence[Any]
    if isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        where = f"data.subset file {path}"
        if not path.is_file():
            raise DataError(
                f"{where} does not exist. Give a file of COCO image ids, one per line or a JSON list."
            )
        text = path.read_text()
        if text.lstrip().startswith("["):
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(f"{where} is not a valid JSON list ({error}).") from None
        else:
            raw = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        raw = list(spec)  # inline, e.g. data.subset='[139,285]' (an OmegaConf ListConfig)
    ids = []
    for position, value in enumerate(raw):
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError  # int() would silently accept these
            ids.append(int(value))
        except (TypeError, ValueError):
            raise DataError(
                f"{where}: entry {position} is {value!r}, not a COCO image id (e.g. 139)."
            ) from None
    if not ids:
        raise DataError(f"{where} lists no image ids.")
    return ids


class CocoCaptionsSource(CaptionedImageSource):
    """COCO images (sorted by image id) with all their captions."""

    def __init__(
        self, root: str | Path, split: str = "train2017", subset: str | Sequence[Any] | None = None
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        annotation_path = self.root / "annotations" / f"captions_{split}.json"
        image_dir = self.root / split
        if not self.root.is_dir():
            raise DataError(
                f"COCO folder {self.root} does not exist. Pass data.root=<folder> holding {split}/ and "
                f"annotations/captions_{split}.json (from {DOWNLOAD_PAGE})."
            )
        if not annotation_path.is_file():
            raise DataError(
                f"Missing COCO caption annotations {annotation_path}: download captions_{split}.json from "
                f"the COCO-2017 annotations archive (annotations_trainval2017.zip, {DOWNLOAD_PAGE}) and "
                f"put it at {annotation_path}."
            )
        if not image_dir.is_dir():
            raise DataError(
                f"Missing COCO image folder {image_dir}: download {split}.zip from {DOWNLOAD_PAGE} and "
                f"unzip it in {self.root}, so that images are at {image_dir}/<file_name>."
            )
        try:
            data = json.loads(annotation_path.read_text())
            names = {int(image["id"]): str(image["file_name"]) for image in data["images"]}
            by_image: dict[int, list[tuple[int, str]]] = defaultdict(list)
            for ann in data["annotations"]:
                caption = str(ann["caption"]).strip()
                if caption:  # an empty caption is no caption
                    by_image[int(ann["image_id"])].append((int(ann["id"]), caption))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise DataError(
                f"{annotation_path} is not a COCO captions file ({type(error).__name__}: {error}); it must "
                "have 'images' [{id, file_name}] and 'annotations' [{image_id, id, caption}]. Re-extract "
                f"captions_{split}.json from the COCO annotations archive."
            ) from error

        if subset is None:
            ids = sorted(names)
        else:
            wanted = set(read_coco_ids(subset))
            unknown = sorted(wanted - names.keys())
            if unknown:
                raise DataError(
                    f"data.subset ({subset}) has {len(unknown)} image id(s) that are not in "
                    f"{annotation_path}: {unknown[:MAX_LISTED]}. Subset ids are COCO image ids of the "
                    f"{split} split; remove the others."
                )
            ids = sorted(wanted)
        uncaptioned = [i for i in ids if not by_image.get(i)]
        if uncaptioned:
            raise DataError(
                f"{len(uncaptioned)} image(s) have no caption in {annotation_path}, e.g. COCO ids "
                f"{uncaptioned[:MAX_LISTED]}. Leave them out with data.subset=<file of the ids to keep>."
            )
        self.coco_ids = ids
        self.file_names = [names[i] for i in ids]
        self._captions = [[caption for _, caption in sorted(by_image[i])] for i in ids]
        # Existence is checked up front (one stat per image) so a partial unzip fails at start-up.
        check_files_exist(image_dir, self.file_names, annotation_path)

    def __len__(self) -> int:
        return len(self.coco_ids)

    def captions(self, idx: int) -> list[str]:
        return self._captions[idx]

    def load_image(self, idx: int) -> Image.Image:
        return open_rgb(self.root / self.split / self.file_names[idx])

    def file_name(self, idx: int) -> str:
        return f"{self.split}/{self.file_names[idx]}"

    def metadata(self, idx: int) -> dict[str, Any]:
        return {"coco_id": self.coco_ids[idx], "file_name": self.file_names[idx]}


class CocoDataModule(CaptionedImageDataModule):
    """`data=coco`: COCO-2017 captions, optionally restricted to a subset of image ids."""

    def __init__(
        self, root: str, split: str = "train2017", subset: str | Sequence[Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.split = split
        self.subset = subset

    def build_source(self) -> CocoCaptionsSource:
        return CocoCaptionsSource(self.root, self.split, self.subset)
