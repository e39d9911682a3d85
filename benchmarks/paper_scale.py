"""Paper-scale cost of the per-sample loss sweep: raw UNet rate, the project's sweep rate, where the
sweep's time goes, and the projected time of one exact MSCOCO query and one AbC query.

    python benchmarks/paper_scale.py --device cuda [--batch-sizes 256 1024 4096] [--images 256]
    python benchmarks/paper_scale.py --device cpu [--quick] [--threads 1] [--bf16]

Prints, in one run:
(a) the raw UNet forward rate (forwards/s, TFLOP/s; FLOPs from torch's FlopCounterMode) at several
    batch sizes: random latents, timesteps and text states, no data, no VAE, no text encoder; then, at
    the largest batch, the rate with each scaled-dot-product attention kernel (`method.attention`);
(b) the project's sweep rate (`objective.sweep.per_sample_losses`, flips x all captions x timesteps as
    in the paper) on the same model over a generated data set, its ratio to the best raw rate, and where
    its time goes: timers (synchronized on CUDA) around the very calls the sweep makes (keyed noise,
    `dataset.example`, `model.encode_images`, `model.encode_text`, `model.predict`), patched in for a
    second, timed run; "other" is the rest (batch layout, indexing, copies back to the host); then the
    engine's rate on the same ids: counter noise drawn on the device in one call per batch and the UNet's
    inputs read from the per-model input cache, held on the device when it fits (its one-time cost
    printed beside it), with the fastest attention kernel of (a);
(c) the projected time of one exact MSCOCO query (118,287 images x 2 flips x 5 captions x 20 timesteps
    = 23.7M forwards) from the engine's sweep rate and from the raw rate, and the size of a one-time cache of
    the sweep's inputs (VAE latents 118,287 x 2 x 4x16x16 and text states 591,435 x 77 x 1024, bf16);
(d) the raw UNet rate of a Stable-Diffusion-1.4-shaped UNet and the projected time of one AbC query
    ((100k pool + exemplars) x 2 flips x 10 timesteps).

`--device cuda` measures the paper's shapes: model=coco_ldm (conf/model/coco_ldm.yaml's UNet) with a
random SD-2-shaped VAE (AutoencoderKL, SD-2's config) and text encoder (CLIPTextModel, width 1024,
23 layers), built in-process with random weights (nothing is downloaded), over a generated folder of
128-px images with 5 captions each, in bf16 autocast; (d) uses SD 1.4's UNet (64x64 latents). These
GPU figures are what the issue's targets are about: the sweep at >= 80% of the raw UNet rate, and the
projected exact MSCOCO query at <= 10 min on one H200.

`--device cpu` measures the same things on small shapes (fp32 unless --bf16): the tiny model
(conf/model/tiny.yaml) on the default shapes world, a shrunk coco_ldm (UNet block_out_channels
[32, 64, 64, 64], a tiny VAE/text encoder as in tests/fixtures_models.py, 32-px images) and a shrunk
SD-1.4-shaped UNet. Its projections are for those small models on this machine, plus the FLOPs of the
full-size UNets (counted on the meta device) at the TFLOP/s achieved here. Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from hydra import compose, initialize_config_dir
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffusion_attribution.compute.input_cache import SweepInputs, encode_inputs, resident_inputs
from diffusion_attribution.data.folder import FolderDataModule
from diffusion_attribution.data.shapes import ShapesDataModule
from diffusion_attribution.models.build import build_tiny_model
from diffusion_attribution.models.coco_ldm import coco_unet_config
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.objective import sweep
from diffusion_attribution.objective.sweep import (
    ATTENTION_BACKENDS,
    SweepEngine,
    attention_kernel,
    per_sample_losses,
)

CONF = Path(__file__).resolve().parents[1] / "conf"

COCO_IMAGES, COCO_CAPTIONS, COCO_TIMESTEPS, FLIPS = 118_287, 5, 20, 2
COCO_FORWARDS = COCO_IMAGES * FLIPS * COCO_CAPTIONS * COCO_TIMESTEPS  # 23,658,700
ABC_POOL, ABC_TIMESTEPS = 100_000, 10
BF16_BYTES = 2

# Stable Diffusion 2's VAE (vae/config.json of stabilityai/stable-diffusion-2-1-base).
SD2_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}
# Stable Diffusion 2's text encoder (OpenCLIP ViT-H/14 text tower as a CLIPTextModel, penultimate layer).
SD2_TEXT = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "vocab_size": 49408,
}
# Stable Diffusion 1.4's UNet: the UNet2DConditionModel defaults with cross_attention_dim 768.
SD14_UNET = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}
SD14_UNET_SMALL = {**SD14_UNET, "sample_size": 32, "block_out_channels": [32, 64, 128, 128]}
TINY_TEXT_WIDTH = 32  # the shrunk coco_ldm's text encoder width, as in tests/fixtures_models.py
WORDS = ["a", "the", "photo", "of", "cat", "dog", "on", "red", "blue", "car", "sitting", "table"]


# ------------------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def unet_flops(
    unet: UNet2DConditionModel, latent: tuple[int, ...], text: tuple[int, int], bf16: bool
) -> float:
    """FLOPs of one forward (FlopCounterMode over a batch of 2, halved), on the UNet's device."""
    device = next(unet.parameters()).device
    sample = torch.randn(2, *latent, device=device)
    states = torch.randn(2, *text, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), autocast(device, bf16):
        unet(sample, torch.tensor([10, 500], device=device), encoder_hidden_states=states)
    return counter.get_total_flops() / 2


def meta_flops(config: dict[str, Any], latent: tuple[int, ...], text: tuple[int, int]) -> float | None:
    """FLOPs of one forward of a full-size UNet, counted on the meta device (no memory, no compute)."""
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        return unet_flops(unet, latent, text, bf16=False)
    except Exception as error:  # diffusers versions differ in what runs on meta tensors
        print(f"  (could not count FLOPs on the meta device: {type(error).__name__}: {error})")
        return None


def raw_rates(
    unet: UNet2DConditionModel,
    latent: tuple[int, ...],
    text: tuple[int, int],
    batch_sizes: list[int],
    bf16: bool,
    min_seconds: float,
    attention: str = "default",
) -> dict[int, float]:
    """Forwards/s of the bare UNet at each batch size (random inputs, one warm-up forward), with the
    named attention kernel."""
    device = next(unet.parameters()).device
    rates = {}
    for b in batch_sizes:
        try:
            sample = torch.randn(b, *latent, device=device)
            states = torch.randn(b, *text, device=device)
            t = torch.randint(0, 1000, (b,), device=device)
            with torch.no_grad(), autocast(device, bf16), attention_kernel(attention):
                unet(sample, t, encoder_hidden_states=states)
                sync(device)
                runs, started = 0, time.perf_counter()
                while runs == 0 or time.perf_counter() - started < min_seconds:
                    unet(sample, t, encoder_hidden_states=states)
                    runs += 1
                    sync(device)
                rates[b] = runs * b / (time.perf_counter() - started)
        except torch.OutOfMemoryError:
            print(f"  batch {b}: out of memory, skipped")
        finally:
            sample = states = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rates


def print_raw(name: str, rates: dict[int, float], flops: float) -> None:
    print(f"\n(a) raw UNet forward rate, {name}: {flops / 1e9:.3f} GFLOP per forward")
    print(f"    {'batch':>6} {'forwards/s':>12} {'TFLOP/s':>9}")
    for b, rate in rates.items():
        print(f"    {b:>6} {rate:>12.1f} {rate * flops / 1e12:>9.4f}")


def attention_rates(
    unet: UNet2DConditionModel,
    latent: tuple[int, ...],
    text: tuple[int, int],
    batch: int,
    bf16: bool,
    min_seconds: float,
    flops: float,
) -> str:
    """The raw rate at `batch` with each attention kernel (those the device lacks are named), the best
    of two passes in opposite orders (a kernel timed first or last is not favoured); returns the
    fastest kernel's name."""
    print(f"    attention kernels at batch {batch} (method.attention; best of 2 passes):")
    rates: dict[str, float] = {}
    missing: dict[str, str] = {}
    for order in (list(ATTENTION_BACKENDS), list(ATTENTION_BACKENDS)[::-1]):
        for name in order:
            if name in missing:
                continue
            try:
                rate = raw_rates(unet, latent, text, [batch], bf16, min_seconds, name)[batch]
            except (RuntimeError, KeyError) as error:  # no such kernel here (or out of memory)
                missing[name] = str(error).splitlines()[0][:80]
                continue
            rates[name] = max(rate, rates.get(name, 0.0))
    for name in ATTENTION_BACKENDS:
        if name in missing:
            print(f"    {name:>10}: not available ({missing[name]})")
        else:
            print(
                f"    {name:>10}: {rates[name]:>12.1f} forwards/s {rates[name] * flops / 1e12:>9.4f} TFLOP/s"
            )
    best = max(rates, key=rates.get)
    print(f"    fastest: {best} ({rates[best] / rates['default']:.2f}x the default)")
    return best


def fmt_time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------- the models
def caption_tokenizer(folder: Path) -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with no merges (every character one token): the token count of
    a caption changes nothing here, the text encoder always sees 77 positions."""
    folder.mkdir(parents=True, exist_ok=True)
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]  # byte-level BPE's stand-ins from U+0100 on
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    tokens = [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )


def coco_model(paper_shape: bool, workdir: Path) -> TextToImageModel:
    """model=coco_ldm built in-process: the paper's UNet with random SD-2-shaped VAE and text encoder
    (paper_shape), or a shrunk UNet with a tiny VAE/text encoder as in tests/fixtures_models.py."""
    tokenizer = caption_tokenizer(workdir / "tokenizer")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        coco = compose("train", overrides=["model=coco_ldm"]).model
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id
    torch.manual_seed(0)
    if paper_shape:
        vae = AutoencoderKL(**SD2_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD2_TEXT, **ids))
        unet = UNet2DConditionModel(**coco_unet_config(coco.unet, sample_size=16))
    else:
        vae = AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            block_out_channels=[8, 8],
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=0.18215,
        )
        width = TINY_TEXT_WIDTH
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                hidden_act="gelu",
                **ids,
            )
        )
        config = coco_unet_config(coco.unet, sample_size=16)
        config.update(block_out_channels=[32, 64, 64, 64], cross_attention_dim=width)
        unet = UNet2DConditionModel(**config)
    scheduler = DDPMScheduler(**dict(coco.scheduler))
    return TextToImageModel(unet, text_encoder, tokenizer, scheduler, vae, train_text_encoder=False).eval()


def generated_folder(root: Path, num_images: int, size: int) -> FolderDataModule:
    """`num_images` smooth random RGB images of `size` px (PNG) with 5 captions each, as data=folder."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_images):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(root / f"{i:06d}.png")
        captions = [" ".join(rng.choice(WORDS, 6)) + f" {i} {c}" for c in range(COCO_CAPTIONS)]
        rows.append(json.dumps({"file_name": f"{i:06d}.png", "text": captions}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return FolderDataModule(root=str(root), resolution=size)


def tiny_model() -> tuple[TextToImageModel, ShapesDataModule]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("attribute", overrides=["model.path=unused"])
    datamodule = ShapesDataModule(cache_dir=cfg.data.cache_dir)
    keys = ("unet", "text_encoder", "scheduler", "max_length", "resolution")
    model = build_tiny_model(datamodule.source.all_captions(), **{k: cfg.model[k] for k in keys})
    return model.eval(), datamodule


# --------------------------------------------------------------------------------- the sweep
@contextlib.contextmanager
def timed_sweep_calls(model: TextToImageModel, dataset: Any) -> Iterator[dict[str, float]]:
    """Wrap the calls `per_sample_losses` makes with synchronized timers (seconds per call kind)."""
    totals: dict[str, float] = defaultdict(float)
    device = model.device

    def timer(name: str, fn: Callable, on_device: bool = True) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if on_device:
                sync(device)
            started = time.perf_counter()
            out = fn(*args, **kwargs)
            if on_device:
                sync(device)
            totals[name] += time.perf_counter() - started
            return out

        return wrapped

    names = ("keyed_randn", "counter_randn", "noisy_inputs", "per_example_loss")
    saved = {name: getattr(sweep, name) for name in names}
    sweep.keyed_randn = timer("noise generation (keyed_randn)", saved["keyed_randn"], False)
    sweep.counter_randn = timer("noise generation (counter_randn)", saved["counter_randn"])
    model.encode_text = timer("text encoding (encode_text)", model.encode_text)
    sweep.noisy_inputs = timer("noisy inputs and targets", saved["noisy_inputs"])
    sweep.per_example_loss = timer("loss reduction", saved["per_example_loss"])
    model.predict = timer("UNet (model.predict)", model.predict)
    model.encode_images = timer("VAE encoding (encode_images)", model.encode_images)
    dataset.example = timer("data loading/decoding (example)", dataset.example, False)
    try:
        yield totals
    finally:
        for name, fn in saved.items():
            setattr(sweep, name, fn)
        del model.encode_images, model.encode_text, dataset.example, model.predict


def run_sweep(
    model: TextToImageModel,
    dataset: Any,
    ids: list[int],
    batch: int,
    bf16: bool,
    noise: str = "generator",
    inputs: SweepInputs | None = None,
    attention: str = "default",
) -> float:
    timesteps = list(range(0, 1000, 1000 // COCO_TIMESTEPS))
    precision = "bf16" if bf16 else "fp32"
    per_sample_losses(
        model,
        dataset,
        ids,
        timesteps,
        None,
        (False, True),
        batch_size=batch,
        noise=noise,
        precision=precision,
        inputs=inputs,
        engine=SweepEngine(attention=attention),
    )
    sync(model.device)
    return len(timesteps)


def engine_inputs(
    model: TextToImageModel, dataset: Any, ids: list[int], batch: int
) -> tuple[SweepInputs, float]:
    """The per-model input cache of `ids` (clean inputs per flip, text states per caption), built in
    memory as compute/input_cache.py builds each shard, and the seconds it took (a one-time cost)."""
    captions = list(range(max(len(dataset.source.captions(i)) for i in ids)))
    sync(model.device)
    started = time.perf_counter()
    encoded = encode_inputs(model, dataset, sorted(ids), (False, True), captions, batch)
    sync(model.device)
    seconds = time.perf_counter() - started
    inputs = SweepInputs(
        ids=torch.as_tensor(sorted(ids)),
        flips=(False, True),
        caption_indices=tuple(captions),
        inputs=encoded["inputs"],
        text_states=encoded["text_states"],
    )
    return inputs, seconds


def measure_sweep(
    name: str,
    model: TextToImageModel,
    dataset: Any,
    ids: list[int],
    batch: int,
    bf16: bool,
    raw: float,
    attention: str = "default",
) -> float:
    """(b): the sweep's forwards/s over `ids` (a warm-up, an untimed-call run, then a timed-call run),
    then the engine's: counter noise drawn on the device, the per-model input cache (on the device when
    it fits) and the `attention` kernel; returns the engine's rate."""
    captions = sum(len(dataset.source.captions(i)) for i in ids)
    run_sweep(model, dataset, ids[:1], batch, bf16)  # warm-up; also decodes the first image
    dataset._cache.clear()  # the measured runs decode every image, as a real sweep does once
    started = time.perf_counter()
    steps = run_sweep(model, dataset, ids, batch, bf16)
    elapsed = time.perf_counter() - started
    forwards = captions * FLIPS * steps
    rate = forwards / elapsed
    dataset._cache.clear()
    with timed_sweep_calls(model, dataset) as totals:
        started = time.perf_counter()
        run_sweep(model, dataset, ids, batch, bf16)
        timed = time.perf_counter() - started
    print(
        f"\n(b) sweep (per_sample_losses), {name}: {len(ids)} images x {FLIPS} flips x captions "
        f"x {int(steps)} timesteps = {forwards} forwards, batch {batch}"
    )
    print(
        f"    default path (per-combination generator noise, inputs encoded in the sweep): {rate:.1f} "
        f"forwards/s ({fmt_time(elapsed)}) = {100 * rate / raw:.0f}% of the best raw UNet rate"
    )
    print(f"    where its time goes (timed run, synchronized timers: {fmt_time(timed)}):")
    for part, seconds in [*totals.items(), ("other", timed - sum(totals.values()))]:
        print(f"      {part:<36} {seconds:>8.3f} s {100 * seconds / timed:>5.1f}%")
    inputs, cache_s = engine_inputs(model, dataset, ids, batch)
    inputs = resident_inputs(inputs, model.device)
    engine_args = (batch, bf16, "counter", inputs, attention)
    run_sweep(model, dataset, ids[:1], *engine_args)  # warm-up
    started = time.perf_counter()
    run_sweep(model, dataset, ids, *engine_args)
    engine_s = time.perf_counter() - started
    engine = forwards / engine_s
    print(
        f"    engine (counter noise on the device, input cache on {inputs.inputs.device}, attention "
        f"{attention}): {engine:.1f} forwards/s ({fmt_time(engine_s)}) = {100 * engine / raw:.0f}% of the "
        f"best raw UNet rate; the cache took {fmt_time(cache_s)} once for these {len(ids)} images"
    )
    return engine


def project_coco(sweep_rate: float, raw_rate: float) -> None:
    print(f"\n(c) one exact MSCOCO query: {COCO_IMAGES:,} x {FLIPS} x {COCO_CAPTIONS} x {COCO_TIMESTEPS}")
    print(f"    = {COCO_FORWARDS:,} forwards")
    print(f"    at the sweep rate:    {fmt_time(COCO_FORWARDS / sweep_rate)}")
    print(f"    at the raw UNet rate: {fmt_time(COCO_FORWARDS / raw_rate)}")
    latents = COCO_IMAGES * FLIPS * 4 * 16 * 16 * BF16_BYTES
    texts = COCO_IMAGES * COCO_CAPTIONS * 77 * 1024 * BF16_BYTES
    print(
        f"    one-time input cache (bf16): latents {COCO_IMAGES:,}x{FLIPS}x4x16x16 = {latents / 1e9:.2f} GB, "
        f"text states {COCO_IMAGES * COCO_CAPTIONS:,}x77x1024 = {texts / 1e9:.1f} GB"
    )


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--quick", action="store_true", help="fewest images and batches: a smoke run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too (always on CUDA)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--sweep-batch", type=int, default=None, help="per_sample_losses batch size")
    parser.add_argument("--images", type=int, default=None, help="images in the generated data set")
    parser.add_argument("--abc-exemplars", type=int, default=4)
    parser.add_argument("--skip-sd14", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    bf16 = cuda or args.bf16
    batches = args.batch_sizes or ([256, 1024, 4096] if cuda else [16, 64])
    if args.quick:
        batches = batches[:2] if cuda else batches[:1]
    sweep_batch = args.sweep_batch or max(batches)
    images = args.images or ((64 if args.quick else 256) if cuda else (2 if args.quick else 8))
    min_seconds = 0.0 if args.quick else (2.0 if cuda else 1.0)
    print(
        f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, {'bf16 autocast' if bf16 else 'fp32'}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not cuda:
            model, datamodule = tiny_model()
            model.to(device)
            latent, text = model.latent_shape, (model.max_length, model.text_encoder.config.hidden_size)
            flops = unet_flops(model.unet, latent, text, bf16)
            rates = raw_rates(model.unet, latent, text, batches, bf16, min_seconds)
            print_raw(f"tiny (conf/model/tiny.yaml), {latent}", rates, flops)
            kernel = attention_rates(model.unet, latent, text, max(rates), bf16, min_seconds, flops)
            ids = list(range(min(images, datamodule.num_examples)))
            measure_sweep("tiny on the shapes world", model, datamodule.full_dataset(), ids, sweep_batch, bf16,
                          max(rates.values()), kernel)  # fmt: skip

        name = "coco_ldm (paper shape, random SD-2 VAE/text encoder)" if cuda else "coco_ldm shrunk"
        model = coco_model(paper_shape=cuda, workdir=work).to(device)
        latent, text = model.latent_shape, (model.max_length, model.text_encoder.config.hidden_size)
        flops = unet_flops(model.unet, latent, text, bf16)
        rates = raw_rates(model.unet, latent, text, batches, bf16, min_seconds)
        print_raw(f"{name}, {latent}, text {text}", rates, flops)
        kernel = attention_rates(model.unet, latent, text, max(rates), bf16, min_seconds, flops)
        raw = max(rates.values())
        best_coco = (raw, raw * flops / 1e12)
        datamodule = generated_folder(work / "images", images, model.image_resolution)
        ids = list(range(images))
        rate = measure_sweep(name, model, datamodule.full_dataset(), ids, sweep_batch, bf16, raw, kernel)
        project_coco(rate, raw)
        if not cuda:
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                coco_unet = coco_unet_config(compose("train", overrides=["model=coco_ldm"]).model.unet, 16)
            full = meta_flops(coco_unet, (4, 16, 16), (77, 1024))
            if full:
                print(
                    f"    the paper-shape UNet ({full / 1e9:.2f} GFLOP/forward) at the {best_coco[1]:.4f} TFLOP/s "
                    f"reached here: {fmt_time(COCO_FORWARDS * full / (best_coco[1] * 1e12))}"
                )
        del model

        if args.skip_sd14:
            return
        config = SD14_UNET if cuda else SD14_UNET_SMALL
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**config).to(device).eval()
        size = config["sample_size"]
        latent, text = (4, size, size), (77, 768)
        sd_batches = list(args.batch_sizes or ([16, 64, 256] if cuda else [2, 8]))
        if args.quick:
            sd_batches = sd_batches[:2] if cuda else sd_batches[:1]
        flops = unet_flops(unet, latent, text, bf16)
        rates = raw_rates(unet, latent, text, sd_batches, bf16, min_seconds)
        params = sum(p.numel() for p in unet.parameters()) / 1e6
        shape = (
            "SD-1.4 shape"
            if cuda
            else f"SD-1.4 layout shrunk, block_out_channels {config['block_out_channels']}"
        )
        print_raw(f"{shape} ({params:.0f}M params), {latent}, text {text}", rates, flops)
        attention_rates(unet, latent, text, max(rates), bf16, min_seconds, flops)
        raw = max(rates.values())
        forwards = (ABC_POOL + args.abc_exemplars) * FLIPS * ABC_TIMESTEPS
        print(
            f"\n(d) one AbC query: ({ABC_POOL:,} pool + {args.abc_exemplars} exemplars) x {FLIPS} flips x "
            f"{ABC_TIMESTEPS} timesteps = {forwards:,} forwards"
        )
        print(f"    at the raw UNet rate: {fmt_time(forwards / raw)}")
        if not cuda:
            full = meta_flops(SD14_UNET, (4, 64, 64), text)
            if full:
                achieved = raw * flops
                print(
                    f"    the full SD-1.4 UNet ({full / 1e9:.0f} GFLOP/forward) at the {achieved / 1e12:.4f} TFLOP/s "
                    f"reached here: {fmt_time(forwards * full / achieved)}"
                )


if __name__ == "__main__":
    main()
