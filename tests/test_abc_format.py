"""The released AbC format (data/abc.py) on small fixtures written in that layout: a customized model
folder (<new1>.bin + pytorch_custom_diffusion_weights.pt) applied to a tiny Stable-Diffusion-layout
pipeline, strict K/V key checks (missing / unexpected keys and missing files are errors naming
them), the pool + exemplars data module, query files, and deterministic exemplar encoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_models import TEXT_WIDTH, write_tiny_sd_components
from omegaconf import OmegaConf
from PIL import Image

from diffusion_attribution.compute.inputs import encode_exemplar_latents
from diffusion_attribution.data.abc import AbcDataModule, read_abc_entry
from diffusion_attribution.data.base import DataError
from diffusion_attribution.models.customization import (
    TOKEN_FILE,
    WEIGHTS_FILE,
    CustomizationError,
    apply_abc_customization,
)
from diffusion_attribution.models.loading import model_from_config
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.models.weight_subsets import select_parameters

REPO = Path(__file__).resolve().parents[1]
CLASS_ID = "n02084071_0001"
NUM_POOL = 5


def write_png(path: Path, seed: int, size: int = 32) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sd_components(tmp_path_factory.mktemp("sd"))


def kv_state(sd: Path, seed: int = 5) -> dict[str, torch.Tensor]:
    unet = TextToImageModel.from_pretrained(sd).unet
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=generator) for n, p in select_parameters(unet, "kv").items()}


@pytest.fixture
def abc_root(tmp_path: Path, sd: Path) -> Path:
    """An AbC release in miniature: one object model (an imagenet class) with 3 exemplars, 2 synth
    images, its token embedding and K/V weights, a task file with the prompts, and a pool folder."""
    root = tmp_path / "abc"
    exemplars = [f"dataset/exemplar/imagenet/images/{CLASS_ID}/{k}.jpg" for k in range(3)]
    for k, rel in enumerate(exemplars):
        write_png(root / rel.removeprefix("dataset/"), seed=k)
    synth = [f"dataset/synth/imagenet/gpt/{CLASS_ID}/samples/{k:05d}.png" for k in range(2)]
    for k, rel in enumerate(synth):
        write_png(root / rel.removeprefix("dataset/"), seed=10 + k)
    entry = {"exemplar": exemplars, "synth": {"gpt": synth}, "class_id": CLASS_ID, "category": "dog"}
    (root / "json").mkdir(parents=True)
    (root / "json" / "test_observed_imagenet.json").write_text(json.dumps([entry]))
    model_dir = root / "models" / "imagenet" / CLASS_ID
    model_dir.mkdir(parents=True)
    torch.save(
        {"<new1>": torch.randn(TEXT_WIDTH, generator=torch.Generator().manual_seed(4))},
        model_dir / TOKEN_FILE,
    )
    torch.save(kv_state(sd), model_dir / WEIGHTS_FILE)
    tasks = [
        {
            "synth_image_path": s.removeprefix("dataset/"),
            "prompt": f"a <new1> dog on a table {k}",
            "test_case": "test_observed_imagenet",
            "test_case_ind": 0,
        }
        for k, s in enumerate(synth)
    ]
    (root / "tasks.json").write_text(json.dumps(tasks))
    pool = root / "laion_subset"
    lines = [
        json.dumps({"file_name": Path(write_png(pool / f"{k}.png", 100 + k)).name, "text": f"photo {k}"})
        for k in range(NUM_POOL)
    ]
    (pool / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def model_dir(root: Path) -> Path:
    return root / "models" / "imagenet" / CLASS_ID


def test_customized_model_is_applied(sd: Path, abc_root: Path) -> None:
    base = TextToImageModel.from_pretrained(sd)
    untouched = {k: v.clone() for k, v in base.unet.state_dict().items()}
    model = apply_abc_customization(TextToImageModel.from_pretrained(sd), model_dir(abc_root))
    expected = kv_state(sd)
    for name, tensor in model.unet.state_dict().items():
        assert torch.equal(tensor, expected.get(name, untouched[name])), name
    token_id = model.tokenizer.convert_tokens_to_ids("<new1>")
    assert model.tokenizer("a <new1> dog", add_special_tokens=False).input_ids.count(token_id) == 1
    row = torch.load(model_dir(abc_root) / TOKEN_FILE, weights_only=True)["<new1>"]
    assert torch.equal(model.text_encoder.get_input_embeddings().weight[token_id], row)
    # model=custom_diffusion builds the same model from the two folders
    cfg = OmegaConf.load(REPO / "conf" / "model" / "custom_diffusion.yaml")
    cfg.base_path, cfg.customization, cfg.resolution = str(sd), str(model_dir(abc_root)), 32
    built = model_from_config(cfg)
    assert torch.equal(built.unet.state_dict()[next(iter(expected))], next(iter(expected.values())))


def test_processor_style_keys_are_accepted(sd: Path, abc_root: Path) -> None:
    renamed = {
        k.replace(".to_k.", ".processor.to_k_custom_diffusion.").replace(
            ".to_v.", ".processor.to_v_custom_diffusion."
        ): v
        for k, v in kv_state(sd).items()
    }
    torch.save(renamed, model_dir(abc_root) / WEIGHTS_FILE)
    model = apply_abc_customization(TextToImageModel.from_pretrained(sd), model_dir(abc_root))
    name, value = next(iter(kv_state(sd).items()))
    assert torch.equal(model.unet.state_dict()[name], value)


def test_missing_and_unexpected_keys_are_errors(sd: Path, abc_root: Path) -> None:
    state = kv_state(sd)
    dropped = sorted(state)[0]
    torch.save({k: v for k, v in state.items() if k != dropped}, model_dir(abc_root) / WEIGHTS_FILE)
    with pytest.raises(CustomizationError, match="missing") as missing:
        apply_abc_customization(TextToImageModel.from_pretrained(sd), model_dir(abc_root))
    assert dropped in str(missing.value) and WEIGHTS_FILE in str(missing.value)

    extra = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"  # a real weight, not K/V
    torch.save({**state, extra: torch.zeros(1)}, model_dir(abc_root) / WEIGHTS_FILE)
    with pytest.raises(CustomizationError, match="unexpected") as unexpected:
        apply_abc_customization(TextToImageModel.from_pretrained(sd), model_dir(abc_root))
    assert extra in str(unexpected.value) and WEIGHTS_FILE in str(unexpected.value)

    bad_shape = {**state, dropped: torch.zeros(3, 3)}
    torch.save(bad_shape, model_dir(abc_root) / WEIGHTS_FILE)
    with pytest.raises(CustomizationError, match="shape"):
        apply_abc_customization(TextToImageModel.from_pretrained(sd), model_dir(abc_root))


def test_missing_or_unsafe_files_are_errors(sd: Path, abc_root: Path) -> None:
    (model_dir(abc_root) / TOKEN_FILE).unlink()
    with pytest.raises(CustomizationError, match=r"<new1>\.bin does not exist"):
        apply_abc_customization(TextToImageModel.from_pretrained(sd), model_dir(abc_root))
    torch.save({"<new1>": torch.zeros(TEXT_WIDTH)}, model_dir(abc_root) / TOKEN_FILE)
    (model_dir(abc_root) / WEIGHTS_FILE).unlink()
    with pytest.raises(CustomizationError, match="pytorch_custom_diffusion_weights.pt does not exist"):
        apply_abc_customization(TextToImageModel.from_pretrained(sd), model_dir(abc_root))
    # A pickled object (not plain tensors) is refused by torch.load(weights_only=True).
    torch.save({"weights": np.arange(3, dtype=object)}, model_dir(abc_root) / WEIGHTS_FILE)
    with pytest.raises(CustomizationError, match="pickled objects other than tensors"):
        apply_abc_customization(TextToImageModel.from_pretrained(sd), model_dir(abc_root))
    with pytest.raises(DataError, match="test_nothing.json does not exist"):
        read_abc_entry(abc_root, "test_nothing", 0)
    (abc_root / "exemplar" / "imagenet" / "images" / CLASS_ID / "1.jpg").unlink()
    with pytest.raises(DataError, match="1.jpg"):
        read_abc_entry(abc_root, "test_observed_imagenet", 0)


def test_pool_then_exemplars_and_queries(abc_root: Path, tmp_path: Path) -> None:
    datamodule = AbcDataModule(
        str(abc_root), "test_observed_imagenet", 0, pool=str(abc_root / "laion_subset"), resolution=32
    )
    source = datamodule.source
    assert len(source) == NUM_POOL + 3 and datamodule.exemplar_ids == [5, 6, 7]
    assert source.captions(0) == ["photo 0"] and source.captions(6) == ["<new1> dog"]
    assert source.file_name(7).endswith("2.jpg")
    entry = datamodule.entry
    assert entry.concept_type == "object" and entry.image_set == "imagenet"
    queries = datamodule.write_queries(abc_root / "tasks.json", tmp_path / "queries.jsonl")
    records = [json.loads(line) for line in queries.read_text().splitlines()]
    assert [r["caption"] for r in records] == ["a <new1> dog on a table 0", "a <new1> dog on a table 1"]
    assert all(r["relevant_ids"] == [5, 6, 7] and r["concept_type"] == "object" for r in records)
    assert all(Path(r["image"]).is_file() for r in records)
    with pytest.raises(DataError, match="data.pool"):
        AbcDataModule(str(abc_root), "test_observed_imagenet", 0, resolution=32).build_source()


def test_exemplar_encoding_is_deterministic(sd: Path, abc_root: Path) -> None:
    model = TextToImageModel.from_pretrained(sd).eval()
    dataset = AbcDataModule(
        str(abc_root), "test_observed_imagenet", 0, pool=str(abc_root / "laion_subset"), resolution=32
    ).full_dataset()
    ids = [5, 6, 7]
    mean = encode_exemplar_latents(model, dataset, ids)
    assert torch.equal(mean, encode_exemplar_latents(model, dataset, ids))
    assert torch.equal(mean[2:], encode_exemplar_latents(model, dataset, ids[2:]))
    pixels = torch.stack([dataset.example(i)["pixel_values"] for i in ids])
    with torch.no_grad():
        posterior_mean = model.vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(mean, posterior_mean * 0.18215)  # scaled by the VAE's factor
    sample = encode_exemplar_latents(model, dataset, ids, sample_seed=1)
    assert torch.equal(sample, encode_exemplar_latents(model, dataset, ids, sample_seed=1))
    assert torch.equal(sample[1:], encode_exemplar_latents(model, dataset, ids[1:], sample_seed=1))
    assert not torch.equal(sample, encode_exemplar_latents(model, dataset, ids, sample_seed=2))
    assert not torch.equal(sample, mean)
