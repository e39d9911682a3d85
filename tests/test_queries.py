"""Attribution queries (data/queries.py): prompt+seed queries are generated and saved, image+caption
queries load (from the config or a JSONL file), and every malformed query is refused with a message
that says what is wrong before anything is computed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from diffusion_attribution.attribution.queries import (
    QueryError,
    build_mask,
    build_queries,
    load_query_image,
    query_specs,
    read_query_file,
)
from diffusion_attribution.data.base import tensor_to_image
from diffusion_attribution.models.sampling import generate

PROMPTS = ["a red circle on a black background", "a striped blue square on a white background"]
STEPS = 2  # sampler steps: enough to exercise generation, cheap on CPU


def query_cfg(**values: Any) -> Any:
    """A `query` config as conf/attribute.yaml lays it out, with `values` overriding."""
    base = {
        "prompts": [],
        "seeds": [],
        "images": [],
        "captions": [],
        "file": None,
        "boxes": None,
        "masks": None,
        "relevant_ids": None,
        "concepts": None,
    }
    return OmegaConf.create({**base, **values})


@pytest.fixture
def model(tiny_model):
    return tiny_model.eval()


@pytest.fixture
def training_png(shapes, tmp_path: Path) -> tuple[Path, torch.Tensor, str]:
    """Training example 3 written as a PNG: (path, its pixels, its first caption)."""
    example = shapes.full_dataset().example(3)
    path = tmp_path / "images" / "example_3.png"
    path.parent.mkdir()
    tensor_to_image(example["pixel_values"]).save(path)
    return path, example["pixel_values"], example["caption"]


def write_png(path: Path, size: tuple[int, int], mode: str = "RGB", value: int = 255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)
    return path


# ----------------------------------------------------------------------------------- good queries
def test_prompt_queries_are_generated_and_saved(model, tmp_path: Path) -> None:
    cfg = query_cfg(prompts=PROMPTS, seeds=[5, 9])
    queries = build_queries(cfg, model, tmp_path, num_steps=STEPS, guidance_scale=2.0)
    assert [q.caption for q in queries] == PROMPTS
    expected = generate(model, PROMPTS, [5, 9], num_steps=STEPS, guidance_scale=2.0)
    for k, query in enumerate(queries):
        assert query.image.shape == (3, 32, 32)
        assert query.latent.shape == model.latent_shape
        assert query.mask is None
        torch.testing.assert_close(query.image, expected.images[k], atol=1e-5, rtol=0)
        torch.testing.assert_close(query.latent, expected.latents[k], atol=1e-5, rtol=0)
        record = query.record()
        assert record["prompt"] == PROMPTS[k] and record["seed"] == [5, 9][k]
        assert (record["num_steps"], record["guidance_scale"], record["sampler"]) == (STEPS, 2.0, "ddim")

        png = tmp_path / "queries" / f"query_{k:03d}.png"
        assert record["saved_image"] == str(png)
        with Image.open(png) as image:
            assert image.size == (32, 32)
            saved_pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))
        torch.testing.assert_close(
            saved_pixels.permute(2, 0, 1) / 127.5 - 1, query.image, atol=1 / 127, rtol=0
        )
        tensors = load_file(tmp_path / "queries" / f"query_{k:03d}.safetensors")
        assert torch.equal(tensors["latent"], query.latent)
        assert torch.equal(tensors["image"], query.image)
        assert "mask" not in tensors


def test_prompts_without_seeds_use_seed_zero() -> None:
    assert [s["seed"] for s in query_specs(query_cfg(prompts=PROMPTS))] == [0, 0]


def test_image_queries_load_with_their_caption(model, training_png, tmp_path: Path) -> None:
    path, pixels, caption = training_png
    box = [4, 8, 20, 24]
    cfg = query_cfg(images=[str(path)], captions=[caption], boxes=[box])
    (query,) = build_queries(cfg, model, tmp_path / "run")
    assert query.caption == caption
    assert torch.equal(query.image, pixels)  # a PNG written from the data reads back exactly
    assert torch.equal(query.latent, pixels)  # a pixel-space model's latent is the image
    assert query.record()["image"] == str(path) and query.record()["box"] == box
    expected = torch.zeros(32, 32)
    expected[8:24, 4:20] = 1
    assert torch.equal(query.mask, expected)
    saved = load_file(tmp_path / "run" / "queries" / "query_000.safetensors")
    assert torch.equal(saved["latent"], pixels) and torch.equal(saved["mask"], expected)


def test_prompt_and_image_queries_together(model, training_png, tmp_path: Path) -> None:
    path, _, caption = training_png
    cfg = query_cfg(prompts=PROMPTS[:1], seeds=[1], images=[str(path)], captions=[caption])
    queries = build_queries(cfg, model, None, num_steps=STEPS)
    assert [q.caption for q in queries] == [PROMPTS[0], caption]
    assert "prompt" in queries[0].source and "image" in queries[1].source
    assert not (tmp_path / "queries").exists()  # no out_dir: nothing written


def test_jsonl_queries_resolve_paths_against_the_file(model, training_png, tmp_path: Path) -> None:
    path, pixels, caption = training_png
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[10:20, 0:16] = 255
    Image.fromarray(mask, mode="L").save(path.parent / "mask.png")
    lines = [
        {"prompt": PROMPTS[1], "seed": 4, "concept": "striped"},
        {"image": path.name, "caption": caption, "mask": "mask.png", "relevant_ids": [3]},
        {"image": str(path), "caption": "a red square on a gray background", "box": [0, 0, 32, 16]},
    ]
    file = path.parent / "queries.jsonl"
    file.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")  # blank lines are fine

    entries = read_query_file(file)
    assert entries[1]["image"] == str(path) and entries[1]["mask"] == str(path.parent / "mask.png")

    queries = build_queries(query_cfg(file=str(file)), model, tmp_path / "run", num_steps=STEPS)
    assert [q.caption for q in queries] == [PROMPTS[1], caption, "a red square on a gray background"]
    assert queries[0].source["seed"] == 4 and queries[0].source["concept"] == "striped"
    assert torch.equal(queries[1].image, pixels)
    assert queries[1].source["relevant_ids"] == [3]
    assert torch.equal(queries[1].mask, torch.from_numpy(mask > 127).float())
    assert queries[2].mask.sum() == 32 * 16 and queries[2].mask[16:].sum() == 0
    assert len(list((tmp_path / "run" / "queries").glob("*.safetensors"))) == 3


def test_per_query_lists_are_aligned() -> None:
    specs = query_specs(
        query_cfg(prompts=PROMPTS, seeds=[1, 2], boxes=[None, [0, 0, 8, 8]], concepts=["none", "striped"])
    )
    assert "box" not in specs[0] and specs[1]["box"] == [0, 0, 8, 8]
    assert [s["concept"] for s in specs] == ["none", "striped"]


# ------------------------------------------------------------------------------------ bad queries
@pytest.mark.parametrize(
    "values,message",
    [
        ({"prompts": PROMPTS, "seeds": [1]}, r"query.prompts has 2 entries but query.seeds has 1"),
        ({"images": ["a.png", "b.png"], "captions": ["a"]}, r"query.images has 2 .* query.captions has 1"),
        ({"prompts": PROMPTS, "boxes": [[0, 0, 4, 4]]}, r"query.boxes has 1 entries for 2"),
        ({}, r"No queries: give query.prompts"),
    ],
)
def test_inconsistent_query_config_is_refused(values: dict, message: str) -> None:
    with pytest.raises(QueryError, match=message):
        query_specs(query_cfg(**values))


def test_query_image_of_the_wrong_size(model, tmp_path: Path) -> None:
    path = write_png(tmp_path / "big.png", (64, 48))
    with pytest.raises(QueryError, match=r"big.png is 64x48 but the model works at 32x32"):
        build_queries(query_cfg(images=[str(path)], captions=["a red circle"]), model)


def test_unreadable_query_image(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    with pytest.raises(QueryError, match=r"corrupt.png cannot be read"):
        load_query_image(corrupt, 32)
    truncated = write_png(tmp_path / "truncated.png", (32, 32))
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(QueryError, match=r"truncated.png cannot be read"):
        load_query_image(truncated, 32)


def test_missing_files(model, tmp_path: Path) -> None:
    with pytest.raises(QueryError, match=r"missing.png does not exist"):
        build_queries(query_cfg(images=[str(tmp_path / "missing.png")], captions=["x"]), model)
    with pytest.raises(QueryError, match=r"query.file=.*nothing.jsonl does not exist"):
        query_specs(query_cfg(file=str(tmp_path / "nothing.jsonl")))
    with pytest.raises(QueryError, match=r"Mask .*no_mask.png cannot be read"):
        build_mask({"mask": str(tmp_path / "no_mask.png")}, 32)


def test_malformed_jsonl(tmp_path: Path) -> None:
    file = tmp_path / "queries.jsonl"
    file.write_text('{"prompt": "a red circle"}\n{"image": "a.png"}\n')
    with pytest.raises(QueryError, match=r"queries.jsonl:2: each line needs"):
        read_query_file(file)
    file.write_text('{"prompt": "a red circle"\n')
    with pytest.raises(QueryError, match=r"queries.jsonl:1 is not valid JSON"):
        read_query_file(file)


@pytest.mark.parametrize(
    "box",
    [[0, 0, 33, 10], [-1, 0, 8, 8], [8, 8, 8, 20], [10, 20, 4, 30], [0, 0, 8]],
    ids=["outside", "negative", "empty-width", "inverted", "three-numbers"],
)
def test_bad_box(box: list[int]) -> None:
    with pytest.raises(QueryError, match=r"Box .*(empty or outside|must be \[x0, y0, x1, y1\])"):
        build_mask({"box": box}, 32)


def test_bad_masks(model, training_png, tmp_path: Path) -> None:
    path, _, caption = training_png
    wrong = write_png(tmp_path / "wrong.png", (16, 16), mode="L")
    with pytest.raises(QueryError, match=r"wrong.png is 16x16 but queries are 32x32"):
        build_queries(query_cfg(images=[str(path)], captions=[caption], masks=[str(wrong)]), model)
    empty = write_png(tmp_path / "empty.png", (32, 32), mode="L", value=0)
    with pytest.raises(QueryError, match=r"empty.png is empty"):
        build_queries(query_cfg(images=[str(path)], captions=[caption], masks=[str(empty)]), model)
    good = write_png(tmp_path / "good.png", (32, 32), mode="L")
    with pytest.raises(QueryError, match=r"both a box and a mask"):
        build_mask({"box": [0, 0, 8, 8], "mask": str(good)}, 32)
    assert build_mask({"mask": str(good)}, 32).sum() == 32 * 32
    assert build_mask({}, 32) is None


def test_bad_query_fails_before_generating(model, monkeypatch, tmp_path: Path) -> None:
    """A bad image query next to prompt queries: the error comes before any sampling is spent."""
    calls = []
    monkeypatch.setattr("diffusion_attribution.attribution.queries.generate", lambda *a, **k: calls.append(1))
    cfg = query_cfg(prompts=PROMPTS, seeds=[1, 2], boxes=[[0, 0, 40, 40], None])
    with pytest.raises(QueryError, match="Box"):
        build_queries(cfg, model, tmp_path)
    assert not calls
