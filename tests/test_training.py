"""Training: the loss goes down, train.py's job writes a diffusers-loadable checkpoint, resuming
continues the step count, and DDP runs on two CPU processes (gloo)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAST_TRAIN, REPO
from diffusers import DDPMScheduler, UNet2DConditionModel
from omegaconf import OmegaConf
from transformers import AutoTokenizer, CLIPTextModel

from diffusion_attribution.data.base import collate_examples
from diffusion_attribution.jobs.train import run_training
from diffusion_attribution.models.pipeline import CONFIG_FILE, TextToImageModel
from diffusion_attribution.training.fit import resolve_resume
from diffusion_attribution.training.module import DiffusionTrainingModule, warmup_cosine


def fixed_batch(datamodule, ids=range(8)) -> dict:
    return collate_examples([datamodule.dataset.example(i) for i in ids])


@torch.no_grad()
def fixed_loss(model: TextToImageModel, batch: dict, repeats: int = 4) -> float:
    """The loss on `batch` with noise and timesteps that never change (spread over the schedule)."""
    generator = torch.Generator().manual_seed(1234)
    latents = model.encode_images(batch["pixel_values"]).repeat(repeats, 1, 1, 1)
    noise = torch.randn(latents.shape, generator=generator)
    num_train = model.scheduler.config.num_train_timesteps
    timesteps = torch.linspace(20, num_train - 20, len(latents)).long()
    text = model.encode_text(batch["caption"] * repeats)
    pred = model.predict(model.add_noise(latents, noise, timesteps), timesteps, text)
    return torch.nn.functional.mse_loss(pred, model.target(latents, noise, timesteps)).item()


def test_warmup_cosine_schedule() -> None:
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100, min_ratio=0.1) == pytest.approx(0.1)  # past the end: the floor
    values = [warmup_cosine(s, 10, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_training_steps_lower_the_loss(tiny_model, shapes) -> None:
    torch.manual_seed(0)
    module = DiffusionTrainingModule(
        tiny_model, max_steps=30, lr=3e-3, text_encoder_lr=3e-3, warmup_steps=0, caption_dropout=0.0
    )
    optimizer = module.configure_optimizers()["optimizer"]
    batch = fixed_batch(shapes)
    before = fixed_loss(tiny_model, batch)
    for _ in range(30):
        optimizer.zero_grad()
        module.training_loss(batch).backward()
        optimizer.step()
    after = fixed_loss(tiny_model, batch)
    assert after < 0.7 * before, (before, after)


def test_training_loss_ignores_the_text_encoder_when_frozen(make_tiny_model, shapes) -> None:
    model = make_tiny_model().eval()  # as loaded from a folder
    model.train_text_encoder = False
    module = DiffusionTrainingModule(model, max_steps=1)
    names = {id(p) for p in module.trainable_parameters()}
    assert names == {id(p) for p in model.unet.parameters()}
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert len(module.configure_optimizers()["optimizer"].param_groups) == 1
    # Lightning keeps a module's mode: the UNet must be put in train mode, the frozen encoder not.
    assert all(m.training for m in model.unet.modules())
    assert not any(m.training for m in model.text_encoder.modules())
    trained = make_tiny_model().eval()
    DiffusionTrainingModule(trained, max_steps=1)
    assert all(m.training for m in trained.unet.modules()) and trained.text_encoder.training


def read_metrics(run_dir: Path) -> list[dict]:
    files = sorted(run_dir.glob("logs/version_*/metrics.csv"))
    assert files, f"no CSV metrics under {run_dir}"
    with files[-1].open() as handle:
        return list(csv.DictReader(handle))


def loss_steps(run_dir: Path) -> list[int]:
    return [int(row["step"]) for row in read_metrics(run_dir) if row.get("train/loss")]


def lightning_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def unet_output(unet: UNet2DConditionModel, text_width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 32, 32, generator=generator)
    states = torch.randn(2, 5, text_width, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 900]), encoder_hidden_states=states).sample


@pytest.fixture
def train_overrides(shapes_cache: Path) -> list[str]:
    return [*FAST_TRAIN, f"data.cache_dir={shapes_cache}"]


def test_run_training_writes_a_diffusers_checkpoint(hydra_run, train_overrides, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = hydra_run(train_overrides, run_dir)
    checkpoint = run_training(cfg, run_dir)
    assert checkpoint == run_dir / "checkpoint"

    model = TextToImageModel.from_pretrained(checkpoint).eval()
    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(checkpoint / "text_encoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(checkpoint / "scheduler")
    width = text_encoder.config.hidden_size
    assert torch.equal(unet_output(unet, width), unet_output(model.unet, width))
    prompt = cfg.samples.prompts[:2]
    input_ids = tokenizer(prompt, padding="max_length", max_length=model.max_length, return_tensors="pt")
    assert torch.equal(input_ids.input_ids, model.tokenize(prompt))
    with torch.no_grad():
        assert torch.equal(text_encoder(input_ids.input_ids)[0], model.encode_text(prompt))
    public = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    assert public == {k: v for k, v in model.scheduler.config.items() if not k.startswith("_")}
    assert torch.equal(scheduler.alphas_cumprod, model.scheduler.alphas_cumprod)
    assert scheduler.config.prediction_type == cfg.model.scheduler.prediction_type

    # The exported weights are the EMA weights, not the last raw ones.
    state = lightning_checkpoint(run_dir)
    assert state["global_step"] == cfg.training.max_steps
    raw = state["state_dict"]["model.unet.conv_in.weight"]
    assert not torch.equal(raw, model.unet.conv_in.weight)

    # The resolved config travels with the weights.
    saved = yaml.safe_load((checkpoint / CONFIG_FILE).read_text())
    assert saved == OmegaConf.to_container(cfg, resolve=True)
    assert saved["logger"]["save_dir"] == str(run_dir)

    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == [
        "step_000002.png",
        "step_000004.png",
    ]
    assert loss_steps(run_dir) == list(range(cfg.training.max_steps))


def test_resume_continues_the_step_count(hydra_run, train_overrides, tmp_path: Path) -> None:
    """An interrupted run (trainer.max_steps below training.max_steps: the LR schedule is the full
    run's) resumed from its run directory finishes at training.max_steps with its state restored.

    The resumed run is not bit-identical to an uninterrupted one: the noise, timesteps and caption
    dropout of `training_loss` come from the global torch RNG (re-seeded at start-up, not saved in
    the Lightning checkpoint) and the resumed epoch reshuffles its batches. So this checks what resume
    guarantees: weights, optimizer and LR schedule continue from the checkpoint, and steps count on
    (for the EMA see test_lightning_checkpoint_holds_the_current_ema).
    """
    total, cut = 8, 4
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    common = [*train_overrides, f"training.max_steps={total}", "samples.every_n_steps=0"]
    run_training(hydra_run([*common, f"trainer.max_steps={cut}"], first_dir), first_dir)
    interrupted = lightning_checkpoint(first_dir)
    assert interrupted["global_step"] == cut

    run_training(hydra_run([*common, f"training.resume={first_dir}"], second_dir), second_dir)
    resumed = lightning_checkpoint(second_dir)
    assert resumed["global_step"] == total
    assert resumed["lr_schedulers"][0]["last_epoch"] == total
    assert resumed["ema"]["optimization_step"] > total - cut  # restored, not restarted
    optimizer_steps = {int(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()}
    assert optimizer_steps == {total}
    assert loss_steps(first_dir) == list(range(cut))
    assert loss_steps(second_dir) == list(range(cut, total))
    key = "model.unet.conv_in.weight"
    assert not torch.equal(resumed["state_dict"][key], interrupted["state_dict"][key])


def test_lightning_checkpoint_holds_the_current_ema(hydra_run, train_overrides, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = hydra_run([*train_overrides, "training.max_steps=2", "samples.every_n_steps=0"], run_dir)
    exported = TextToImageModel.from_pretrained(run_training(cfg, run_dir))
    state = lightning_checkpoint(run_dir)
    assert state["ema"]["optimization_step"] == state["global_step"] == 2
    weights = [*exported.unet.parameters(), *exported.text_encoder.parameters()]
    shadow = state["ema"]["shadow_params"]
    assert len(shadow) == len(weights)
    assert all(torch.equal(s, w) for s, w in zip(shadow, weights, strict=True))


def test_resolve_resume(tmp_path: Path) -> None:
    assert resolve_resume(None, tmp_path) is None
    ckpt = tmp_path / "old" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    assert resolve_resume(str(tmp_path / "old"), tmp_path) == str(ckpt)
    assert resolve_resume(str(ckpt), tmp_path) == str(ckpt)
    with pytest.raises(FileNotFoundError, match=r"training.resume=.*missing.*last\.ckpt"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)


def test_ddp_on_two_cpu_processes(shapes_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    overrides = [*FAST_TRAIN, f"data.cache_dir={shapes_cache}", "trainer=ddp", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "distributed_backend=gloo" in output
    assert "GLOBAL_RANK: 1" in output
    model = TextToImageModel.from_pretrained(run_dir / "checkpoint")
    assert model.image_resolution == 32
    saved = yaml.safe_load((run_dir / "checkpoint" / CONFIG_FILE).read_text())
    assert (saved["trainer"]["strategy"], saved["trainer"]["devices"]) == ("ddp", 2)
    assert lightning_checkpoint(run_dir)["global_step"] == 4
