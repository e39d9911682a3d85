"""`data=shapes`: the embedded world (deterministic from the seed, rare concepts, captions), and the
base datamodule's contracts on it: stable ids under exclusion, exclusion specs, explicit flips."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_WORLD, compose_train
from hydra.utils import instantiate
from PIL import Image

from diffusion_attribution.data.base import DataError, parse_id_list
from diffusion_attribution.data.folder import FolderDataModule
from diffusion_attribution.data.shapes import (
    RARE_CONCEPTS,
    ShapesWorldConfig,
    generate_world,
    materialize_world,
)

WORLD = ShapesWorldConfig(**TINY_WORLD)
NUM_EXAMPLES = TINY_WORLD["num_common"] + len(RARE_CONCEPTS) * TINY_WORLD["images_per_rare_concept"]


@pytest.fixture(scope="module")
def world() -> tuple[np.ndarray, list[dict]]:
    return generate_world(WORLD)


def test_same_seed_same_world(world, tmp_path: Path) -> None:
    images, records = world
    again_images, again_records = generate_world(WORLD)
    assert np.array_equal(images, again_images)
    assert records == again_records
    # ... also through the on-disk cache, wherever it lives.
    first, second = materialize_world(WORLD, tmp_path / "a"), materialize_world(WORLD, tmp_path / "b")
    assert np.array_equal(np.load(first / "images.npy"), np.load(second / "images.npy"))
    assert (first / "metadata.jsonl").read_text() == (second / "metadata.jsonl").read_text()


def test_other_seed_other_world(world) -> None:
    images, records = world
    other_images, other_records = generate_world(replace(WORLD, seed=1))
    assert other_images.shape == images.shape
    assert not np.array_equal(images, other_images)
    assert records != other_records
    assert WORLD.fingerprint() != replace(WORLD, seed=1).fingerprint()  # no cache collision


def test_rare_concepts_counts_and_metadata(shapes) -> None:
    source = shapes.source
    assert len(source) == shapes.num_examples == NUM_EXAMPLES
    concepts = Counter(source.metadata(i)["concept"] for i in range(len(source)))
    assert concepts.pop(None) == TINY_WORLD["num_common"]
    assert concepts == {c: TINY_WORLD["images_per_rare_concept"] for c in RARE_CONCEPTS}
    rare_ids = [i for i in range(len(source)) if source.metadata(i)["concept"]]
    assert rare_ids != list(range(TINY_WORLD["num_common"], NUM_EXAMPLES))  # spread, not appended


def test_configured_rare_concepts(make_shapes) -> None:
    datamodule = make_shapes(rare_concepts=["striped", "hollow"], images_per_rare_concept=3)
    concepts = Counter(datamodule.source.metadata(i)["concept"] for i in range(datamodule.num_examples))
    assert concepts == {None: TINY_WORLD["num_common"], "striped": 3, "hollow": 3}
    with pytest.raises(ValueError, match="sparkly"):
        make_shapes(rare_concepts=["striped", "sparkly"])


def test_every_caption_names_its_attributes(shapes) -> None:
    source = shapes.source
    for idx in range(len(source)):
        meta = source.metadata(idx)
        captions = source.captions(idx)
        assert len(captions) == 3 and len(set(captions)) == 3
        for caption in captions:
            words = caption.replace(",", " ").split()
            for attribute in ("colour", "shape", "background"):
                assert meta[attribute] in words, (idx, caption)
            if meta["concept"]:
                assert meta["concept"] in words
            assert not set(words) & (set(RARE_CONCEPTS) - {meta["concept"]}), (idx, caption)


def test_images_match_metadata(shapes) -> None:
    source = shapes.source
    for idx in range(len(source)):
        pixels = np.asarray(source.load_image(idx))
        assert pixels.shape == (32, 32, 3)
        assert pixels[0, 0].tolist() == source.metadata(idx)["background_rgb"]  # corners are background


def test_file_names_are_relative_to_the_root(shapes) -> None:
    source = shapes.source
    for idx in (0, len(source) - 1):
        name = source.file_name(idx)
        assert not Path(name).is_absolute()
        assert np.array_equal(np.asarray(Image.open(source.root / name)), source.images[idx])


def test_cache_reads_back_as_an_image_folder(shapes) -> None:
    """The cached world is a valid `data=folder` tree: same ids, captions and pixels."""
    folder = FolderDataModule(root=str(shapes.source.root), batch_size=8)
    assert folder.num_examples == shapes.num_examples
    for idx in (0, 17, shapes.num_examples - 1):
        assert folder.source.captions(idx) == shapes.source.captions(idx)
        assert folder.source.file_name(idx) == shapes.source.file_name(idx)
        assert torch.equal(folder.dataset.image_tensor(idx), shapes.dataset.image_tensor(idx))
    assert folder.source.metadata(5)["concept"] == shapes.source.metadata(5)["concept"]


def test_ids_are_stable_under_exclusion(make_shapes) -> None:
    full = make_shapes()
    excluded = [0, 5, 17, NUM_EXAMPLES - 1]
    partial = make_shapes(exclude=excluded)
    assert partial.num_examples == full.num_examples  # the id range does not shrink
    assert partial.excluded_ids.tolist() == excluded
    assert partial.train_ids.tolist() == [i for i in range(NUM_EXAMPLES) if i not in excluded]
    assert len(partial.dataset) == NUM_EXAMPLES - len(excluded)
    for position in (0, 4, 15, len(partial.dataset) - 1):
        item = partial.dataset[position]
        idx = int(partial.train_ids[position])
        assert item["id"] == idx
        reference = full.dataset.example(idx, item["caption_index"], item["flip"])
        assert torch.equal(item["pixel_values"], reference["pixel_values"])
        assert item["caption"] == reference["caption"]
    # Scoring always sees every id, excluded or not.
    assert partial.full_dataset().ids.tolist() == list(range(NUM_EXAMPLES))


def test_training_batches_never_contain_excluded_ids(make_shapes) -> None:
    excluded = list(range(0, NUM_EXAMPLES, 3))
    datamodule = make_shapes(exclude=excluded)
    datamodule.setup("fit")
    seen = torch.cat([batch["id"] for batch in datamodule.train_dataloader()]).tolist()
    assert not set(seen) & set(excluded)
    assert len(seen) == len(set(seen))  # one epoch, each kept example at most once


def write_ids(path: Path, ids: list[int]) -> Path:
    if path.suffix == ".npy":
        np.save(path, np.asarray(ids, dtype=np.int64))
    elif path.suffix == ".json":
        path.write_text(json.dumps(ids))
    else:
        path.write_text("".join(f"{i}\n" for i in ids) + "\n")
    return path


@pytest.mark.parametrize("kind", ["list", "txt", "json", "npy", "int"])
def test_exclusion_specs(kind: str, make_shapes, tmp_path: Path) -> None:
    ids = [3] if kind == "int" else [9, 2, 9, 40]
    expected = sorted(set(ids))
    spec = {
        "list": ids,
        "int": 3,
        "txt": str(tmp_path / "ids.txt"),
        "json": str(tmp_path / "ids.json"),
        "npy": str(tmp_path / "ids.npy"),
    }[kind]
    if kind in ("txt", "json", "npy"):
        write_ids(Path(spec), ids)
    datamodule = make_shapes(exclude=spec)
    assert datamodule.excluded_ids.tolist() == expected
    assert sorted(set(range(NUM_EXAMPLES)) - set(datamodule.train_ids.tolist())) == expected


def test_exclusion_from_the_command_line(tmp_path: Path) -> None:
    """Hydra parses `data.exclude=3` as an int and `data.exclude=[1,2]` as a list."""
    world = ["data.num_common=8", "data.images_per_rare_concept=1", f"data.cache_dir={tmp_path}"]
    for value, expected in (("3", [3]), ("[4,1]", [1, 4]), ("null", [])):
        datamodule = instantiate(compose_train([*world, f"data.exclude={value}"]).data)
        assert datamodule.excluded_ids.tolist() == expected


@pytest.mark.parametrize(
    "spec,message",
    [
        ([1, NUM_EXAMPLES], rf"ids \[{NUM_EXAMPLES}\] are out of range.*0\.\.{NUM_EXAMPLES - 1}"),
        ([-1], r"ids \[-1\] are out of range"),
        (NUM_EXAMPLES + 5, rf"ids \[{NUM_EXAMPLES + 5}\] are out of range"),
        ([1, 2.5], r"entry 1 is 2\.5, not an integer id"),
        ([0, "seven"], r"entry 1 is 'seven', not an integer id"),
        ([True], r"entry 0 is True, not an integer id"),
        (True, r"data\.exclude is True, not an id list"),
        (False, r"data\.exclude is False"),
        ("does/not/exist.txt", r"does/not/exist\.txt does not exist"),
    ],
)
def test_bad_exclusions_name_the_problem(spec, message: str, make_shapes) -> None:
    with pytest.raises(DataError, match=message):
        make_shapes(exclude=spec).train_ids  # noqa: B018 (the property parses the spec)


def test_bad_entry_in_an_id_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ids.txt"
    path.write_text("1\n2\nthree\n")
    with pytest.raises(DataError, match=r"ids\.txt: entry 2 is 'three'"):
        parse_id_list(str(path), 10)
    with pytest.raises(DataError, match="json.*entry 0 is True"):
        parse_id_list(write_ids(tmp_path / "bools.json", [True]), 10)  # type: ignore[list-item]


def test_excluding_everything_fails_at_setup(make_shapes) -> None:
    datamodule = make_shapes(exclude=list(range(NUM_EXAMPLES)))
    with pytest.raises(DataError, match="Every example is excluded"):
        datamodule.setup("fit")


def test_explicit_flip_and_caption_index(shapes) -> None:
    dataset = shapes.dataset
    idx = 11
    plain = dataset.example(idx, caption_index=0, flip=False)
    flipped = dataset.example(idx, caption_index=0, flip=True)
    assert plain["id"] == flipped["id"] == idx
    assert flipped["flip"] is True and plain["flip"] is False
    assert torch.equal(flipped["pixel_values"], plain["pixel_values"].flip(-1))
    assert plain["pixel_values"].shape == (3, 32, 32)
    assert -1.0 <= plain["pixel_values"].min() and plain["pixel_values"].max() <= 1.0
    captions = shapes.source.captions(idx)
    for k, caption in enumerate(captions):
        assert dataset.example(idx, caption_index=k)["caption"] == caption
    wrapped = dataset.example(idx, caption_index=len(captions) + 1)
    assert (wrapped["caption_index"], wrapped["caption"]) == (1, captions[1])
    # Same arguments, same tensors (no hidden randomness in explicit access).
    assert torch.equal(dataset.example(idx, 2, True)["pixel_values"], flipped["pixel_values"])


def test_random_flip_only_when_enabled(make_shapes) -> None:
    torch.manual_seed(0)
    assert not any(make_shapes().dataset[i]["flip"] for i in range(32))
    flips = [make_shapes(random_flip=True).dataset[i]["flip"] for i in range(32)]
    assert any(flips) and not all(flips)


def test_distinct_concept_colours_redraw_only_the_marks(world, make_shapes) -> None:
    """`concept_colours: distinct` draws the same world (layouts, captions) with each rare concept's
    marks in a colour of its own that no other image has; plain images are unchanged."""
    from diffusion_attribution.data.shapes import CONCEPT_COLOURS

    images, records = world
    distinct_images, distinct_records = generate_world(replace(WORLD, concept_colours="distinct"))
    concepts = [rec["concept"] for rec in records]
    assert [rec["concept"] for rec in distinct_records] == concepts
    assert [{k: v for k, v in rec.items() if k != "pattern_rgb"} for rec in distinct_records] == records
    for idx, concept in enumerate(concepts):
        same = np.array_equal(images[idx], distinct_images[idx])
        # hollow has no marks to colour and haloed keeps its cyan halo: those two look the same.
        assert same == (concept in (None, "hollow", "haloed")), (idx, concept)
    for concept, rgb in CONCEPT_COLOURS.items():
        if concept == "haloed":
            continue
        near = np.abs(distinct_images.astype(int) - np.asarray(rgb)).max(-1) <= 12
        has_colour = near.reshape(len(images), -1).any(1)
        assert all(has_colour[i] for i, c in enumerate(concepts) if c == concept), concept
        assert not any(has_colour[i] for i, c in enumerate(concepts) if c != concept), concept
    with pytest.raises(ValueError, match="concept_colours"):
        make_shapes(concept_colours="rainbow")


def test_world_fingerprints_keep_the_first_world_and_key_the_drawing(make_shapes) -> None:
    from diffusion_attribution.utils.fingerprint import data_fingerprint

    # The first world's key (its cached data, models and retrains) is unchanged by the new field.
    assert ShapesWorldConfig().fingerprint() == "3418de7eabaf"
    assert ShapesWorldConfig(concept_colours="distinct").fingerprint() != ShapesWorldConfig().fingerprint()
    # Same file names and captions, other pixels: caches keyed by the data must not collide.
    white, distinct = make_shapes(), make_shapes(concept_colours="distinct")
    white.setup("fit")
    distinct.setup("fit")
    assert white.source.all_captions() == distinct.source.all_captions()
    assert data_fingerprint(white) != data_fingerprint(distinct)
