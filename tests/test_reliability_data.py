"""Reliability of the data layer on tiny fixtures: content-keyed folder caches, 16-bit and transparent
images, paths outside the data root, malformed id files and shapes caches, the released AbC LAION pool
layout, COCO's order and id kinds, and a log free of third-party noise."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

import diffusion_attribution  # noqa: F401 (installs the log filters under test)
from diffusion_attribution.data import folder as folder_module
from diffusion_attribution.data.abc import AbcDataModule
from diffusion_attribution.data.base import (
    CaptionedImageDataset,
    CaptionedImageSource,
    DataError,
    parse_id_list,
    to_rgb,
)
from diffusion_attribution.data.coco import CocoCaptionsSource, CocoDataModule
from diffusion_attribution.data.folder import FolderDataModule, ImageFolderSource, open_rgb
from diffusion_attribution.data.shapes import ShapesDataModule, ShapesSource
from diffusion_attribution.utils.fingerprint import data_fingerprint

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
OLD = 1_600_000_000  # an mtime (2020) long enough ago for a digest to be remembered


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Per-file digests go to a temporary XDG cache, never the user's ~/.cache."""
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def write_folder(root: Path, names: list[str], suffix: str = ".png") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, name in enumerate(names):
        Image.new("RGB", (8, 8), (40 * k, 90, 200)).save(root / f"{name}{suffix}")
        rows.append(json.dumps({"file_name": f"{name}{suffix}", "text": f"image {name}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


# ------------------------------------------------------------------ 1. caches keyed by content
def test_editing_an_image_in_place_changes_the_data_fingerprint(tmp_path: Path, private_cache: Path) -> None:
    root = write_folder(tmp_path / "data", ["a", "b"])
    before = data_fingerprint(FolderDataModule(str(root), resolution=8))
    assert data_fingerprint(FolderDataModule(str(root), resolution=8)) == before  # stable
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "b.png")  # same name, other pixels
    after = data_fingerprint(FolderDataModule(str(root), resolution=8))
    assert after != before
    assert not [p for p in root.iterdir() if p.suffix == ".json"]  # nothing written into the data


def test_same_size_edit_with_remembered_digests_is_rehashed(
    tmp_path: Path, private_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BMP files of one size have one byte count: only the mtime tells the edit apart."""
    root = write_folder(tmp_path / "data", ["a", "b"], suffix=".bmp")
    for name in ("a.bmp", "b.bmp"):
        os.utime(root / name, ns=(OLD * 10**9, OLD * 10**9))
    hashed: list[Path] = []
    real_sha1 = folder_module._sha1_of_file
    monkeypatch.setattr(folder_module, "_sha1_of_file", lambda p: hashed.append(p) or real_sha1(p))

    first = ImageFolderSource(root).content_key()
    assert len(hashed) == 2
    caches = list((private_cache / "diffusion_attribution" / "file-digests").glob("*.json"))
    assert len(caches) == 1 and set(json.loads(caches[0].read_text())["files"]) == {"a.bmp", "b.bmp"}
    assert ImageFolderSource(root).content_key() == first and len(hashed) == 2  # read from the cache

    size = (root / "b.bmp").stat().st_size
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "b.bmp")
    assert (root / "b.bmp").stat().st_size == size
    os.utime(root / "b.bmp", ns=(OLD * 10**9, (OLD + 5) * 10**9))
    second = ImageFolderSource(root).content_key()
    assert second != first and hashed[-1] == root / "b.bmp" and len(hashed) == 3


def test_corrupt_digest_cache_is_rebuilt(tmp_path: Path, private_cache: Path) -> None:
    root = write_folder(tmp_path / "data", ["a"])
    os.utime(root / "a.png", ns=(OLD * 10**9, OLD * 10**9))
    key = ImageFolderSource(root).content_key()
    (cache,) = (private_cache / "diffusion_attribution" / "file-digests").glob("*.json")
    cache.write_text('{"version": 1, "root": "')  # truncated
    assert ImageFolderSource(root).content_key() == key
    assert json.loads(cache.read_text())["files"]["a.png"]["size"] == (root / "a.png").stat().st_size


# ------------------------------------------------------------------ 2. 16-bit and transparency
def saved(tmp_path: Path, image: Image.Image, name: str, **kwargs: object) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_16_bit_png_is_scaled_not_saturated(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
    path = saved(tmp_path, Image.fromarray(values), "deep.png")
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # the file really is 16-bit
    pixels = np.asarray(open_rgb(path))
    assert pixels[0, :, 0].tolist() == [0, 100, 255, 4]  # 1000 / 257 = 3.9 -> 4, not 255
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_rgba_la_and_palette_transparency_composite_onto_white(tmp_path: Path) -> None:
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # red hidden under full transparency
    rgba[0, 1] = (0, 0, 0, 128)  # half-transparent black
    rgba[0, 2] = (10, 200, 30, 255)  # opaque
    pixels = np.asarray(open_rgb(saved(tmp_path, Image.fromarray(rgba, "RGBA"), "rgba.png")))
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert all(abs(int(v) - 127) <= 1 for v in pixels[0, 1])
    assert pixels[0, 2].tolist() == [10, 200, 30]

    la = np.array([[[0, 0], [50, 255]]], dtype=np.uint8)
    pixels = np.asarray(open_rgb(saved(tmp_path, Image.fromarray(la, "LA"), "la.png")))
    assert pixels[0].tolist() == [[255, 255, 255], [50, 50, 50]]

    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))  # 0: red (transparent), 1: blue
    palette.putpixel((1, 0), 1)
    path = saved(tmp_path, palette, "p.png", transparency=0)
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    assert np.asarray(open_rgb(path))[0].tolist() == [[255, 255, 255], [0, 0, 255]]


class RawSource(CaptionedImageSource):
    """Hands out images in their own mode, as a source without open_rgb may."""

    def __init__(self, images: list[Image.Image]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def captions(self, idx: int) -> list[str]:
        return ["x"]

    def load_image(self, idx: int) -> Image.Image:
        return self.images[idx]

    def file_name(self, idx: int) -> str:
        return f"{idx}.png"


def test_dataset_tensors_convert_16_bit_and_alpha() -> None:
    deep = Image.fromarray(np.full((4, 4), 257 * 60, dtype=np.uint16))
    clear = Image.fromarray(np.zeros((4, 4, 4), dtype=np.uint8), "RGBA")  # black, fully transparent
    dataset = CaptionedImageDataset(RawSource([deep, clear]), resolution=4)
    assert (dataset.image_tensor(0) == 60).all()
    assert (dataset.image_tensor(1) == 255).all()
    assert to_rgb(Image.new("RGB", (1, 1), (1, 2, 3))).getpixel((0, 0)) == (1, 2, 3)


# ------------------------------------------------------------------ 3. paths outside the root
@pytest.mark.parametrize("outside", ["../outside.png", "sub/../../outside.png", "ABSOLUTE"])
def test_file_names_outside_the_root_are_refused(tmp_path: Path, outside: str) -> None:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "outside.png")
    name = str(tmp_path / "outside.png") if outside == "ABSOLUTE" else outside
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "x"}) + "\n")
    with pytest.raises(
        DataError, match=r"metadata\.jsonl line 1.*outside the image folder.*allow_outside_root=true"
    ):
        ImageFolderSource(root)
    config = OmegaConf.merge({"model": {"resolution": 8}}, {"data": OmegaConf.load(CONF / "folder.yaml")})
    config.data.root = str(root)
    assert config.data.allow_outside_root is False
    config.data.allow_outside_root = True
    datamodule = instantiate(config.data)
    assert datamodule.full_dataset().image_tensor(0).shape == (3, 8, 8)


def test_dot_dot_that_stays_inside_is_fine(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "data", ["a"])
    (root / "sub").mkdir()
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/../a.png", "text": "x"}) + "\n")
    assert len(ImageFolderSource(root)) == 1


# ------------------------------------------------------------------ 4. malformed files name file + fix
@pytest.mark.parametrize(
    "name,write,message",
    [
        ("bad.json", lambda p: p.write_text("[1, 2,"), r"bad\.json is not valid JSON.*JSON list"),
        ("dict.json", lambda p: p.write_text('{"ids": [1]}'), r"dict\.json holds a JSON dict, not a list"),
        ("float.npy", lambda p: np.save(p, np.array([1.0, 2.0])), r"float\.npy holds a float64.*numpy\.save"),
        ("grid.npy", lambda p: np.save(p, np.zeros((2, 2), np.int64)), r"grid\.npy holds a int64 \(2, 2\)"),
        (
            "cut.npy",
            lambda p: (np.save(p, np.arange(100)), p.write_bytes(p.read_bytes()[:150])),
            r"cut\.npy is not a readable \.npy.*truncated.*numpy\.save",
        ),
        ("junk.npy", lambda p: p.write_bytes(b"not an array"), r"junk\.npy is not a readable \.npy"),
        (
            "objects.npy",
            lambda p: np.save(p, np.array([1, "a"], dtype=object)),
            r"objects\.npy is not a readable \.npy",
        ),
        ("binary.txt", lambda p: p.write_bytes(b"\xff\xfe\x00"), r"binary\.txt is not a text file"),
    ],
)
def test_malformed_id_files_name_the_file_and_the_fix(tmp_path: Path, name: str, write, message: str) -> None:
    path = tmp_path / name
    write(path)
    with pytest.raises(DataError, match=message):
        parse_id_list(str(path), 10)


def test_integer_npy_and_json_still_parse(tmp_path: Path) -> None:
    np.save(tmp_path / "ids.npy", np.array([3, 1, 3], dtype=np.int32))
    (tmp_path / "ids.json").write_text("[4, 2]")
    assert parse_id_list(str(tmp_path / "ids.npy"), 10).tolist() == [1, 3]
    assert parse_id_list(str(tmp_path / "ids.json"), 10).tolist() == [2, 4]


def small_world(cache: Path) -> ShapesDataModule:
    return ShapesDataModule(
        num_common=6, images_per_rare_concept=1, rare_concepts=["striped"], cache_dir=str(cache), resolution=8
    )


def test_truncated_shapes_cache_is_regenerated_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = small_world(tmp_path).source
    expected = first.images.copy()
    images_path = first.root / "images.npy"
    images_path.write_bytes(images_path.read_bytes()[:200])  # a copy or a disk cut short
    with pytest.raises(DataError, match=r"images\.npy.*truncated or corrupt.*Delete the folder"):
        ShapesSource(first.root)
    with caplog.at_level(logging.WARNING, logger="diffusion_attribution.data.shapes"):
        again = small_world(tmp_path).source
    assert "images.npy" in caplog.text and "Regenerating" in caplog.text
    np.testing.assert_array_equal(again.images, expected)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


# ------------------------------------------------------------------ 5. the released AbC LAION pool
def write_abc(root: Path) -> Path:
    exemplar = root / "exemplar" / "artchive" / "images" / "painter" / "0.jpg"
    exemplar.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(exemplar)
    entry = {"exemplar": ["dataset/exemplar/artchive/images/painter/0.jpg"], "class_id": "painter"}
    (root / "json").mkdir()
    (root / "json" / "test_artchive.json").write_text(json.dumps([entry]))
    pool = root / "laion_subset"
    (pool / "images").mkdir(parents=True)
    for k, name in enumerate(["000002.jpg", "000000.jpg", "000010.png", "000001.jpg"]):
        Image.new("RGB", (8, 8), (k, k, k)).save(pool / "images" / name)
    (pool / "images" / "notes.txt").write_text("not an image")
    # sorted: 000000.jpg, 000001.jpg, 000002.jpg, 000010.png
    (pool / "captions.txt").write_text("caption zero\ncaption one\ncaption two\ncaption ten\n")
    return root


def test_released_laion_pool_is_read_as_is(tmp_path: Path) -> None:
    root = write_abc(tmp_path / "abc")
    datamodule = AbcDataModule(str(root), "test_artchive", 0, pool=str(root / "laion_subset"), resolution=8)
    source = datamodule.source
    assert len(source) == 5 and datamodule.exemplar_ids == [4]
    assert [source.file_name(i) for i in range(4)] == [
        "images/000000.jpg",
        "images/000001.jpg",
        "images/000002.jpg",
        "images/000010.png",
    ]
    assert [source.captions(i) for i in range(4)] == [
        ["caption zero"],
        ["caption one"],
        ["caption two"],
        ["caption ten"],
    ]
    assert source.captions(4) == ["A picture in the style of <new1> art"]
    assert np.asarray(source.load_image(2))[0, 0].tolist() == [0, 0, 0]  # 000002.jpg was written first
    limited = AbcDataModule(
        str(root), "test_artchive", 0, pool=str(root / "laion_subset"), pool_size=2, resolution=8
    )
    assert len(limited.source) == 3 and limited.source.captions(1) == ["caption one"]
    assert data_fingerprint(limited) != data_fingerprint(datamodule)


def test_released_pool_errors_name_the_fix(tmp_path: Path) -> None:
    root = write_abc(tmp_path / "abc")
    pool = root / "laion_subset"
    (pool / "captions.txt").write_text("only one\n")
    with pytest.raises(
        DataError, match=r"captions\.txt has 1 lines but .* 4 images.*data\.pool_size=N.*100000"
    ):
        AbcDataModule(str(root), "test_artchive", 0, pool=str(pool), resolution=8).build_source()
    with pytest.raises(DataError, match=r"data\.pool_size=9.*4 images"):
        AbcDataModule(str(root), "test_artchive", 0, pool=str(pool), pool_size=9, resolution=8).build_source()
    config = OmegaConf.load(CONF / "abc.yaml")
    assert "pool_size" in config and config.pool_size is None


def test_pool_metadata_hint_names_the_pool_key(tmp_path: Path) -> None:
    root = write_abc(tmp_path / "abc")
    empty = tmp_path / "empty_pool"
    empty.mkdir()
    with pytest.raises(DataError, match=r"data\.pool_metadata=<name>") as info:
        AbcDataModule(str(root), "test_artchive", 0, pool=str(empty), resolution=8).build_source()
    assert "data.metadata" not in str(info.value)
    pool = write_folder(tmp_path / "folder_pool", ["a"])
    with pytest.raises(DataError, match=r"data\.pool_metadata=other\.jsonl") as info:
        AbcDataModule(
            str(root), "test_artchive", 0, pool=str(pool), pool_metadata="other.jsonl", resolution=8
        ).build_source()
    assert "data.metadata" not in str(info.value)


# ------------------------------------------------------------------ 6. COCO order and id kinds
def write_coco(root: Path) -> Path:
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = []
    for image_id in (397, 139, 285):  # JSON order differs from id order
        name = f"{image_id:012d}.jpg"
        Image.new("RGB", (8, 8), (image_id % 256, 0, 0)).save(root / "train2017" / name)
        images.append({"id": image_id, "file_name": name})
    annotations = []
    for image_id in (397, 139, 285):
        annotations.append({"image_id": image_id, "id": 10 * image_id + 2, "caption": f"b {image_id}"})
        annotations.append({"image_id": image_id, "id": 10 * image_id + 1, "caption": f"a {image_id}"})
    document = {"images": images, "annotations": annotations}
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(document))
    return root


def test_coco_order_json_follows_the_file(tmp_path: Path) -> None:
    root = write_coco(tmp_path)
    by_id = CocoCaptionsSource(root)
    assert by_id.coco_ids == [139, 285, 397] and by_id.captions(0) == ["a 139", "b 139"]
    upstream = CocoCaptionsSource(root, order="json")
    assert upstream.coco_ids == [397, 139, 285] and upstream.captions(0) == ["b 397", "a 397"]
    assert CocoCaptionsSource(root, subset_coco_ids=[285, 397], order="json").coco_ids == [397, 285]
    config = OmegaConf.merge({"model": {"resolution": 8}}, {"data": OmegaConf.load(CONF / "coco.yaml")})
    config.data.root = str(root)
    assert config.data.order == "coco_id"
    config.data.order = "json"
    assert instantiate(config.data).source.coco_ids == [397, 139, 285]
    with pytest.raises(DataError, match=r"data\.order='random'.*coco_id.*json"):
        CocoCaptionsSource(root, order="random")


def test_coco_subset_key_is_renamed_and_id_kinds_are_named(tmp_path: Path) -> None:
    root = write_coco(tmp_path)
    with pytest.raises(DataError, match=r"data\.subset was renamed.*data\.subset_coco_ids=\[139\]"):
        CocoDataModule(str(root), subset=[139])
    config = OmegaConf.merge({"model": {"resolution": 8}}, {"data": OmegaConf.load(CONF / "coco.yaml")})
    config.data.root = str(root)
    config.data.subset = [139]
    with pytest.raises(Exception, match=r"data\.subset was renamed.*data\.subset_coco_ids"):
        instantiate(config.data)  # Hydra wraps the DataError, keeping its message
    with pytest.raises(DataError, match=r"not COCO image ids.*\[0, 1\].*data\.exclude takes positions"):
        CocoCaptionsSource(root, subset_coco_ids=[0, 1])  # positions given where COCO ids belong
    datamodule = CocoDataModule(str(root), subset_coco_ids=[139, 285], exclude=[285], resolution=8)
    with pytest.raises(DataError, match=r"valid ids are 0\.\.1 \(positions.*not .*COCO image ids"):
        datamodule.train_ids  # noqa: B018 (COCO ids given where positions belong)


# ------------------------------------------------------------------ 7. a clean log
RANK_ZERO_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")
ACCELERATE_LOGGER = "diffusers.models.modeling_utils"


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def collected() -> Collect:
    """Records as the emitting loggers handle them (lightning and diffusers do not propagate to the
    root logger, so caplog alone would see nothing either way)."""
    handler = Collect()
    loggers = [logging.getLogger(n) for n in (*RANK_ZERO_LOGGERS, ACCELERATE_LOGGER)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield handler
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_no_litlogger_tip_on_a_trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, collected: Collect
) -> None:
    import pytorch_lightning as pl

    monkeypatch.chdir(tmp_path)
    pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", devices=1)
    out, err = capfd.readouterr()
    logged = "\n".join(collected.messages)
    assert "GPU available" in logged  # the Trainer's own information still comes through
    assert "litlogger" not in out + err + logged and "Tip:" not in out + err + logged


def test_filters_drop_only_the_two_messages(collected: Collect) -> None:
    """The filters match text on the emitting loggers; other messages of those loggers still pass."""
    rank_zero = logging.getLogger(RANK_ZERO_LOGGERS[0])
    diffusers = logging.getLogger(ACCELERATE_LOGGER)
    rank_zero.info("💡 Tip: ... try installing [litlogger](https://pypi.org/project/litlogger/) ...")
    rank_zero.info("TPU available: False")
    diffusers.warning("Cannot initialize model with low cpu memory usage because `accelerate` was not found")
    diffusers.warning("Some weights of the model checkpoint were not used")
    logged = "\n".join(collected.messages)
    assert "litlogger" not in logged and "accelerate" not in logged
    assert "TPU available" in logged and "weights of the model checkpoint" in logged
