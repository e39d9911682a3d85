"""`data=coco`: MS-COCO 2017 captions in the official layout.

    <root>/annotations/captions_train2017.json   {"images": [{id, file_name, ...}],
                                                   "annotations": [{image_id, id, caption}]}
    <root>/train2017/<file_name>

Canonical order (`data.order`):

    coco_id (default)  images sorted by COCO image id, an image's captions sorted by annotation id: ids
                       do not depend on how the JSON file happens to be ordered.
    json               images in the order of the JSON's "images" list and captions in the order of its
                       "annotations" list, as upstream code that iterates over the file does; use it to
                       compare rankings and score arrays position by position with upstream arrays.

Two kinds of id, never interchangeable:

    data.subset_coco_ids  COCO image ids (the JSON's images[].id, e.g. 139) of the images to keep.
    data.exclude          positions 0..N-1 in the canonical order of the kept images (as every data set).

The old key `data.subset` is refused with a message naming `data.subset_coco_ids`.
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
ORDERS = ("coco_id", "json")
SUBSET_KEY = "data.subset_coco_ids"
ID_KINDS = (
    f"{SUBSET_KEY} takes COCO image ids (the 'id' of the JSON's images, e.g. 139); data.exclude takes "
    "positions 0..N-1 in the canonical order"
)


def read_coco_ids(spec: str | Path | Sequence[Any]) -> list[int]:
    """COCO image ids given inline or as a file (one id per line, or a JSON list)."""
    where = SUBSET_KEY
    raw: Sequence[Any]
    if isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        where = f"{SUBSET_KEY} file {path}"
        if not path.is_file():
            raise DataError(
                f"{where} does not exist. Give a file of COCO image ids, one per line or a JSON list."
            )
        text = path.read_text()
        if text.lstrip().startswith("["):
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{where} is not a valid JSON list ({error}). Write the COCO image ids as one JSON list "
                    "(e.g. [139, 285]) or one per line."
                ) from None
        else:
            raw = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        raw = list(spec)  # inline, e.g. data.subset_coco_ids='[139,285]' (an OmegaConf ListConfig)
    ids = []
    for position, value in enumerate(raw):
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError  # int() would silently accept these
            ids.append(int(value))
        except (TypeError, ValueError):
            raise DataError(
                f"{where}: entry {position} is {value!r}, not a COCO image id (e.g. 139). {ID_KINDS}."
            ) from None
    if not ids:
        raise DataError(f"{where} lists no image ids. Give the COCO image ids to keep, or null for all.")
    return ids


class CocoCaptionsSource(CaptionedImageSource):
    """COCO images with all their captions, in the canonical order `order` (module docstring)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train2017",
        subset_coco_ids: str | Sequence[Any] | None = None,
        order: str = "coco_id",
    ) -> None:
        if order not in ORDERS:
            raise DataError(
                f"data.order={order!r} is not an order; use coco_id (images by COCO id, captions by "
                "annotation id) or json (the annotation file's own order, as upstream)."
            )
        self.root = Path(root).expanduser()
        self.split = split
        self.order = order
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
            json_order = list(dict.fromkeys(int(image["id"]) for image in data["images"]))
            # (sort key, caption): the annotation id, or the annotation's position in the JSON
            by_image: dict[int, list[tuple[int, str]]] = defaultdict(list)
            for position, ann in enumerate(data["annotations"]):
                caption = str(ann["caption"]).strip()
                if caption:  # an empty caption is no caption
                    key = int(ann["id"]) if order == "coco_id" else position
                    by_image[int(ann["image_id"])].append((key, caption))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise DataError(
                f"{annotation_path} is not a COCO captions file ({type(error).__name__}: {error}); it must "
                "have 'images' [{id, file_name}] and 'annotations' [{image_id, id, caption}]. Re-extract "
                f"captions_{split}.json from the COCO annotations archive."
            ) from error

        every = sorted(names) if order == "coco_id" else json_order
        if subset_coco_ids is None:
            ids = every
        else:
            wanted = set(read_coco_ids(subset_coco_ids))
            unknown = sorted(wanted - names.keys())
            if unknown:
                raise DataError(
                    f"{SUBSET_KEY} ({subset_coco_ids}) has {len(unknown)} id(s) that are not COCO image ids "
                    f"in {annotation_path}: {unknown[:MAX_LISTED]}. {ID_KINDS}; remove the others (to "
                    "leave out positions of the canonical order, use data.exclude)."
                )
            ids = [i for i in every if i in wanted]
        uncaptioned = [i for i in ids if not by_image.get(i)]
        if uncaptioned:
            raise DataError(
                f"{len(uncaptioned)} image(s) have no caption in {annotation_path}, e.g. COCO ids "
                f"{uncaptioned[:MAX_LISTED]}. Leave them out with {SUBSET_KEY}=<file of the COCO image "
                "ids to keep>."
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
    """`data=coco`: COCO-2017 captions, optionally restricted to some COCO image ids."""

    def __init__(
        self,
        root: str,
        split: str = "train2017",
        subset_coco_ids: str | Sequence[Any] | None = None,
        order: str = "coco_id",
        subset: Any = None,
        **kwargs: Any,
    ) -> None:
        if subset is not None:
            raise DataError(
                f"data.subset was renamed: give the COCO image ids to keep with {SUBSET_KEY}={subset} "
                "(data.exclude, by contrast, takes positions 0..N-1 in the canonical order)."
            )
        if order not in ORDERS:
            raise DataError(f"data.order={order!r} is not an order; use one of {list(ORDERS)}.")
        super().__init__(**kwargs)
        self.root = root
        self.split = split
        self.subset_coco_ids = subset_coco_ids
        self.order = order

    def build_source(self) -> CocoCaptionsSource:
        return CocoCaptionsSource(self.root, self.split, self.subset_coco_ids, self.order)
