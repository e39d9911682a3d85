"""`data=coco`: the official COCO-2017 caption layout, canonical order by image id, subsets, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from diffusion_attribution.data.base import DataError
from diffusion_attribution.data.coco import CocoCaptionsSource, CocoDataModule

CONF = Path(__file__).resolve().parents[1] / "conf" / "data" / "coco.yaml"
IMAGE_IDS = (397, 139, 285)  # listed out of order on purpose: canonical order is by image id


def coco_name(image_id: int) -> str:
    return f"{image_id:012d}.jpg"


def make_coco(
    root: Path, image_ids: tuple[int, ...] = IMAGE_IDS, captioned: tuple[int, ...] = IMAGE_IDS
) -> Path:
    """A tiny COCO-2017 tree: 40x30 JPEGs in train2017/ and captions_train2017.json."""
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = []
    for image_id in image_ids:
        Image.new("RGB", (40, 30), (image_id % 256, 80, 160)).save(root / "train2017" / coco_name(image_id))
        images.append({"id": image_id, "file_name": coco_name(image_id), "width": 40, "height": 30})
    # Annotation ids out of order, with stray whitespace as in the real file.
    annotations = []
    for image_id in captioned:
        annotations.append({"image_id": image_id, "id": 10 * image_id + 2, "caption": f"second {image_id}\n"})
        annotations.append({"image_id": image_id, "id": 10 * image_id + 1, "caption": f" first {image_id}"})
    document = {"info": {}, "licenses": [], "images": images, "annotations": annotations[::-1]}
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(document))
    return root


def test_canonical_order_by_image_id_and_captions(tmp_path: Path) -> None:
    source = CocoCaptionsSource(make_coco(tmp_path))
    assert len(source) == 3
    assert [source.metadata(i)["coco_id"] for i in range(3)] == [139, 285, 397]
    assert source.metadata(0) == {"coco_id": 139, "file_name": coco_name(139)}
    assert source.file_name(0) == f"train2017/{coco_name(139)}"
    assert source.captions(2) == ["first 397", "second 397"]  # by annotation id, stripped
    assert source.load_image(0).size == (40, 30)


@pytest.mark.parametrize("subset_text", ["397\n139\n\n", "[397, 139]"])
def test_subset_file_keeps_canonical_order(tmp_path: Path, subset_text: str) -> None:
    make_coco(tmp_path)
    subset = tmp_path / "subset.txt"
    subset.write_text(subset_text)
    source = CocoCaptionsSource(tmp_path, subset_coco_ids=str(subset))
    assert [source.metadata(i)["coco_id"] for i in range(len(source))] == [139, 397]


def test_subset_unknown_ids_named(tmp_path: Path) -> None:
    make_coco(tmp_path)
    subset = tmp_path / "subset.txt"
    subset.write_text("139\n12345\n")
    with pytest.raises(DataError, match=r"not COCO image ids in .*captions_train2017\.json: \[12345\]"):
        CocoCaptionsSource(tmp_path, subset_coco_ids=str(subset))


def test_datamodule_tensors_exclude_and_batch(tmp_path: Path) -> None:
    datamodule = CocoDataModule(str(make_coco(tmp_path)), resolution=8, batch_size=2, exclude=[1])
    datamodule.setup("fit")
    pixels = datamodule.full_dataset().example(1)["pixel_values"]
    assert pixels.shape == (3, 8, 8) and pixels.min() >= -1 and pixels.max() <= 1
    assert datamodule.train_ids.tolist() == [0, 2]
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"id", "pixel_values", "caption", "caption_index", "flip"}
    assert sorted(batch["id"].tolist()) == [0, 2]
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["flip"].dtype == torch.bool


def test_config_instantiates(tmp_path: Path) -> None:
    make_coco(tmp_path)
    config = OmegaConf.merge({"model": {"resolution": 16}}, {"data": OmegaConf.load(CONF)})
    config.data.root = str(tmp_path)
    datamodule = instantiate(config.data)
    assert isinstance(datamodule, CocoDataModule) and datamodule.resolution == 16
    assert datamodule.num_examples == 3


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere.*data\.root=<folder>"):
        CocoCaptionsSource(tmp_path / "nowhere")


def test_missing_annotation_file_names_expected_path(tmp_path: Path) -> None:
    make_coco(tmp_path)
    expected = tmp_path / "annotations" / "captions_train2017.json"
    expected.unlink()
    with pytest.raises(
        DataError, match=rf"download captions_train2017\.json.*put it at {re.escape(str(expected))}"
    ):
        CocoCaptionsSource(tmp_path)


def test_missing_image_folder(tmp_path: Path) -> None:
    make_coco(tmp_path)
    (tmp_path / "train2017").rename(tmp_path / "elsewhere")
    with pytest.raises(DataError, match=r"Missing COCO image folder .*train2017"):
        CocoCaptionsSource(tmp_path)


def test_missing_image_file_named(tmp_path: Path) -> None:
    make_coco(tmp_path)
    (tmp_path / "train2017" / coco_name(285)).unlink()
    with pytest.raises(DataError, match=coco_name(285)):
        CocoCaptionsSource(tmp_path)


def test_images_without_caption_named(tmp_path: Path) -> None:
    make_coco(tmp_path, captioned=(139, 397))
    with pytest.raises(DataError, match=r"no caption.*\[285\]"):
        CocoCaptionsSource(tmp_path)
    subset = tmp_path / "subset.txt"
    subset.write_text("139\n397\n")  # the documented fix: leave the uncaptioned image out
    assert len(CocoCaptionsSource(tmp_path, subset_coco_ids=str(subset))) == 2


def test_corrupt_image_fails_on_load_naming_file(tmp_path: Path) -> None:
    make_coco(tmp_path)
    (tmp_path / "train2017" / coco_name(285)).write_bytes(b"garbage" * 20)
    source = CocoCaptionsSource(tmp_path)
    with pytest.raises(DataError, match=coco_name(285)):
        source.load_image(1)
