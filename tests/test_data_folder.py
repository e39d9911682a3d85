"""`data=folder`: metadata.jsonl / metadata.csv image folders, their ids and their error messages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from diffusion_attribution.data.base import DataError
from diffusion_attribution.data.folder import FolderDataModule, ImageFolderSource

CONF = Path(__file__).resolve().parents[1] / "conf" / "data" / "folder.yaml"
GREEN = (0, 200, 0)


def write_image(path: Path, colour: tuple[int, int, int] = GREEN) -> None:
    """A 40x30 image: `colour` in the centre 30x30 square, red/blue bands that centre cropping removes."""
    image = Image.new("RGB", (40, 30), colour)
    image.paste((255, 0, 0), (0, 0, 5, 30))
    image.paste((0, 0, 255), (35, 0, 40, 30))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_jsonl(root: Path, rows: list[dict], name: str = "metadata.jsonl") -> None:
    (root / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def make_folder(root: Path) -> Path:
    """Three images listed out of alphabetical order (ids must follow the rows, not the names)."""
    for name in ("b.png", "a.jpg", "sub/c.png"):
        write_image(root / name)
    write_jsonl(
        root,
        [
            {"file_name": "b.png", "text": "a photo of b", "label": 1},
            {"file_name": "a.jpg", "text": ["first of a", "second of a"], "label": 2},
            {"file_name": "sub/c.png", "text": "  c with spaces  ", "label": 3},
        ],
    )
    return root


def test_jsonl_order_captions_and_metadata(tmp_path: Path) -> None:
    source = ImageFolderSource(make_folder(tmp_path))
    assert len(source) == 3
    assert [source.file_name(i) for i in range(3)] == ["b.png", "a.jpg", "sub/c.png"]
    assert source.captions(0) == ["a photo of b"]
    assert source.captions(1) == ["first of a", "second of a"]
    assert source.captions(2) == ["c with spaces"]
    assert source.metadata(1) == {"label": 2}
    assert source.load_image(1).size == (40, 30)


def test_csv_with_json_list_captions(tmp_path: Path) -> None:
    for name in ("x.png", "y.png"):
        write_image(tmp_path / name)
    with (tmp_path / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "text", "source"])
        writer.writerow(["y.png", '["one", "two"]', "web"])
        writer.writerow(["x.png", "just [one] caption", "scan"])
    source = ImageFolderSource(tmp_path)
    assert [source.file_name(i) for i in range(2)] == ["y.png", "x.png"]
    assert source.captions(0) == ["one", "two"]
    assert source.captions(1) == ["just [one] caption"]
    assert source.metadata(0) == {"source": "web"}


def test_jsonl_preferred_and_explicit_metadata_name(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / "metadata.csv").write_text("file_name,text\nb.png,from csv\n")
    assert len(ImageFolderSource(tmp_path)) == 3  # metadata.jsonl wins the auto-detection
    (tmp_path / "other.csv").write_text("file_name,text\na.jpg,only a\n")
    source = ImageFolderSource(tmp_path, "other.csv")
    assert len(source) == 1 and source.captions(0) == ["only a"]


def test_tensors_are_centre_cropped_resized_and_scaled(tmp_path: Path) -> None:
    dataset = FolderDataModule(str(make_folder(tmp_path)), resolution=8).full_dataset()
    for idx in range(3):
        pixels = dataset.example(idx)["pixel_values"]
        assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
        assert pixels.min() >= -1 and pixels.max() <= 1
    # The red/blue side bands of the PNG are cropped away: only the green centre remains.
    expected = (torch.tensor(GREEN, dtype=torch.float32) / 127.5 - 1)[:, None, None].expand(3, 8, 8)
    assert torch.allclose(dataset.example(0)["pixel_values"], expected, atol=0.01)
    example = dataset.example(1, caption_index=1)
    assert example["caption"] == "second of a" and example["id"] == 1


def test_exclude_keeps_ids_and_dataloader_batch(tmp_path: Path) -> None:
    datamodule = FolderDataModule(str(make_folder(tmp_path)), resolution=8, batch_size=2, exclude=[1])
    datamodule.setup("fit")
    assert datamodule.num_examples == 3
    assert datamodule.train_ids.tolist() == [0, 2]
    assert len(datamodule.dataset) == 2
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"id", "pixel_values", "caption", "caption_index", "flip"}
    assert sorted(batch["id"].tolist()) == [0, 2]
    assert batch["pixel_values"].shape == (2, 3, 8, 8)


def test_config_instantiates(tmp_path: Path) -> None:
    make_folder(tmp_path)
    config = OmegaConf.merge({"model": {"resolution": 16}}, {"data": OmegaConf.load(CONF)})
    config.data.root = str(tmp_path)
    datamodule = instantiate(config.data)
    assert isinstance(datamodule, FolderDataModule) and datamodule.resolution == 16
    assert datamodule.num_examples == 3


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere.*data\.root=<folder>"):
        ImageFolderSource(tmp_path / "nowhere")


def test_missing_metadata_file(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"metadata\.jsonl or metadata\.csv"):
        ImageFolderSource(tmp_path)
    with pytest.raises(DataError, match=r"captions\.csv"):
        ImageFolderSource(tmp_path, "captions.csv")


def test_missing_column_names_columns_found(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("file_name,caption\na.png,hello\n")
    with pytest.raises(
        DataError, match=r"metadata\.csv line 2 has no 'text' column.*\['caption', 'file_name'\]"
    ):
        ImageFolderSource(tmp_path)


def test_empty_caption_list(tmp_path: Path) -> None:
    make_folder(tmp_path)
    write_jsonl(tmp_path, [{"file_name": "b.png", "text": "ok"}, {"file_name": "a.jpg", "text": []}])
    with pytest.raises(DataError, match=r"metadata\.jsonl line 2 has an empty caption"):
        ImageFolderSource(tmp_path)


def test_invalid_json_line(tmp_path: Path) -> None:
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{not json\n')
    with pytest.raises(DataError, match=r"metadata\.jsonl line 2 is not valid JSON"):
        ImageFolderSource(tmp_path)


def test_duplicate_file_names(tmp_path: Path) -> None:
    make_folder(tmp_path)
    rows = [{"file_name": n, "text": "t"} for n in ("b.png", "a.jpg", "./b.png")]
    write_jsonl(tmp_path, rows)
    with pytest.raises(DataError, match=r"more than once: b\.png \(lines \[1, 3\]\)"):
        ImageFolderSource(tmp_path)


def test_missing_image_files(tmp_path: Path) -> None:
    make_folder(tmp_path)
    rows = [{"file_name": n, "text": "t"} for n in ("b.png", "gone.png", "lost.jpg")]
    write_jsonl(tmp_path, rows)
    with pytest.raises(DataError, match=r"2 image\(s\).*gone\.png, lost\.jpg"):
        ImageFolderSource(tmp_path)


def test_corrupt_image_fails_on_load_naming_file(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"this is not a png" * 10)
    write_jsonl(tmp_path, [{"file_name": "b.png", "text": "t"}, {"file_name": "bad.png", "text": "t"}])
    datamodule = FolderDataModule(str(tmp_path), resolution=8)
    assert datamodule.num_examples == 2  # decoding is lazy: building the source succeeds
    datamodule.full_dataset().example(0)
    with pytest.raises(DataError, match=r"bad\.png"):
        datamodule.full_dataset().example(1)
