"""Custom Diffusion (modules/customization.py): only the cross-attention K/V and the new token's
embedding row train (every other weight bit-identical, the other embedding rows included), the token
changes what the model generates, and a customized model saves and loads (full folder, delta on the
base, model=custom_diffusion, train.py experiment=customize) with identical outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from small_models import small_model

from diffusion_attribution.data.abc_embedded import render_exemplars, write_image_folder
from diffusion_attribution.data.customization import CustomizationDataModule
from diffusion_attribution.jobs.train import run_training
from diffusion_attribution.models.customization import (
    DELTA_FILE,
    CustomizationError,
    add_concept_tokens,
    load_customization,
    token_embedding_table,
)
from diffusion_attribution.models.loading import model_from_config
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.models.sampling import generate
from diffusion_attribution.models.weight_subsets import select_parameters
from diffusion_attribution.training.customization import CustomDiffusionModule

RESOLUTION = 16
PROMPT = "a red <new1> on a black background"


def fit(module: CustomDiffusionModule, datamodule: CustomizationDataModule, steps: int) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)


@pytest.fixture(scope="module")
def exemplars(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images, records = render_exemplars("star", 4, seed=0, resolution=RESOLUTION)
    return write_image_folder(tmp_path_factory.mktemp("star"), images, records)


@pytest.fixture
def base(make_shapes) -> tuple[TextToImageModel, object]:
    shapes = make_shapes(resolution=RESOLUTION)
    return small_model(shapes.source.all_captions()), shapes


def state(model: TextToImageModel) -> dict[str, torch.Tensor]:
    tensors = {f"unet.{k}": v.detach().clone() for k, v in model.unet.state_dict().items()}
    tensors.update({f"text.{k}": v.detach().clone() for k, v in model.text_encoder.state_dict().items()})
    return tensors


def unet_output(model: TextToImageModel, prompt: str = PROMPT) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    noisy = torch.randn(2, *model.latent_shape, generator=generator)
    with torch.no_grad():
        return model.predict(noisy, torch.tensor([100, 700]), model.encode_text([prompt, prompt]))


def test_only_kv_and_the_new_row_train(base, exemplars: Path) -> None:
    model, shapes = base
    model.eval()  # as loaded from a checkpoint
    module = CustomDiffusionModule(model, max_steps=3, lr=1e-2, embedding_lr=1e-1, weight_decay=0.1)
    assert all(m.training for m in model.modules()), "customization trains in train mode"
    (token_id,) = module.token_ids
    before = state(model)
    datamodule = CustomizationDataModule(
        str(exemplars),
        regularization=shapes,
        resolution=RESOLUTION,
        batch_size=2,
        regularization_batch_size=2,
    )
    fit(module, datamodule, steps=3)
    after = state(model)
    kv = {f"unet.{name}" for name in select_parameters(model.unet, "kv")}
    table = next(k for k in after if k.endswith("token_embedding.weight"))
    changed = sorted(k for k in after if not torch.equal(before[k], after[k]))
    assert set(changed) == kv | {table}, "only the K/V weights and the embedding table may change"
    for name in kv:  # every K/V tensor moved
        assert not torch.equal(before[name], after[name])
    rows_changed = (before[table] != after[table]).any(dim=1).nonzero().flatten().tolist()
    assert rows_changed == [token_id], "the other embedding rows must stay bit-identical"


def test_the_token_changes_generations(base, exemplars: Path) -> None:
    model, _ = base
    module = CustomDiffusionModule(
        model, max_steps=4, initializer_words=["circle"], lr=3e-2, embedding_lr=3e-1
    )
    plain = PROMPT.replace("<new1>", "circle")

    def sample(prompt: str) -> torch.Tensor:
        return generate(model, [prompt], [0], num_steps=3).images

    # Initialized from "circle", the token draws what "circle" draws; after training it does not.
    assert torch.equal(sample(PROMPT), sample(plain))
    fit(module, CustomizationDataModule(str(exemplars), resolution=RESOLUTION, batch_size=4), steps=4)
    token_images, plain_images = sample(PROMPT), sample(plain)
    assert (token_images - plain_images).abs().mean() > 1e-3
    # and the token's row left its initializer's
    table = token_embedding_table(model).weight
    circle = model.tokenizer.convert_tokens_to_ids("circle")
    assert not torch.equal(table[module.token_ids[0]], table[circle])


def test_customized_checkpoint_saves_and_loads(base, exemplars: Path, tmp_path: Path) -> None:
    model, _ = base
    base_dir = model.save_pretrained(tmp_path / "base")
    module = CustomDiffusionModule(model, max_steps=2, lr=1e-2, embedding_lr=1e-1)
    fit(module, CustomizationDataModule(str(exemplars), resolution=RESOLUTION, batch_size=4), steps=2)
    expected = unet_output(model)
    folder = module.save_customized(tmp_path / "custom")
    assert (folder / DELTA_FILE).is_file() and (folder / "customization.json").is_file()

    reloaded = TextToImageModel.from_pretrained(folder)  # the full folder
    assert torch.equal(unet_output(reloaded), expected)
    on_base = load_customization(TextToImageModel.from_pretrained(base_dir), folder / DELTA_FILE)
    assert torch.equal(unet_output(on_base), expected)
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "custom_diffusion.yaml")
    cfg.base_path, cfg.customization, cfg.resolution = str(base_dir), str(folder), RESOLUTION
    assert torch.equal(unet_output(model_from_config(cfg)), expected)
    # The delta is small: the K/V weights and one row, not the model.
    assert (folder / DELTA_FILE).stat().st_size < (folder / "unet").stat().st_size + 10**6


def test_a_delta_with_other_kv_shapes_is_refused(base, tmp_path: Path, exemplars: Path) -> None:
    model, _ = base
    module = CustomDiffusionModule(model, max_steps=1)
    folder = module.save_customized(tmp_path / "custom")
    other = small_model(["a cat on a mat"], smaller=False)  # the 32 px tiny model: other widths
    with pytest.raises(CustomizationError, match="shape"):
        load_customization(other, folder)
    with pytest.raises(CustomizationError, match="does not exist"):
        load_customization(other, tmp_path / "nowhere")
    with pytest.raises(CustomizationError, match="Initializer word"):
        add_concept_tokens(model, ["<new2>"], ["zebra"])


def test_train_py_experiment_customize(
    base, exemplars: Path, hydra_run, shapes_cache: Path, tmp_path: Path
) -> None:
    """The whole job: base checkpoint + exemplars (+ its own training data as regularisation)."""
    model, shapes = base
    world = {
        "_target_": "diffusion_attribution.data.shapes.ShapesDataModule",
        "num_common": 64,
        "images_per_rare_concept": 4,
        "cache_dir": str(shapes_cache),
        "resolution": RESOLUTION,
    }
    base_dir = model.save_pretrained(tmp_path / "base", config={"data": world})
    cfg = hydra_run(
        [
            "experiment=customize",
            f"model.path={base_dir}",
            f"model.resolution={RESOLUTION}",
            f"data.exemplars={exemplars}",
            "data.regularization=base",
            "data.regularization_size=8",
            "data.batch_size=2",
            "training.max_steps=2",
            "training.checkpoint_every_n_steps=2",
            "trainer.enable_progress_bar=false",
            f"data.sample_prompts=['{PROMPT}']",
            "samples.num_steps=2",
        ]
    )
    checkpoint = run_training(cfg, tmp_path / "run")
    customized = TextToImageModel.from_pretrained(checkpoint)
    assert "<new1>" in customized.tokenizer.get_vocab()
    assert (tmp_path / "run" / "samples").is_dir()  # the end-of-training sample grid with the token
    on_base = load_customization(TextToImageModel.from_pretrained(base_dir), checkpoint)
    assert torch.equal(unet_output(on_base), unet_output(customized))
