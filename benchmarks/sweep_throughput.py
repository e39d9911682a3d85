"""How fast is the per-sample loss sweep, and how close to the machine's matmul-bound rate?

    python benchmarks/sweep_throughput.py [--ids 256] [--batch-size 64] [--threads 2] [--skip-coco]

Prints, on this machine:
- UNet forwards/s in `per_sample_losses` for the default tiny model (conf/model/tiny.yaml) on the
  default world, with the FLOPs of one forward (torch's FlopCounterMode) and so the achieved GFLOP/s;
- the GFLOP/s of a plain float32 matmul of similar size, and the sweep's fraction of it;
- the time of one query's sweep on the default (all ids x timesteps x captions of conf/method/unlearning.yaml);
- for the paper's MSCOCO model (conf/model/coco_ldm.yaml, random init, text states of width 1024): the
  measured cost of one forward here and the projected time of the paper's 23.7M-forward sweep.
"""

from __future__ import annotations

import argparse
import time

import torch
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

from diffusion_attribution.data.shapes import ShapesDataModule
from diffusion_attribution.models.build import build_tiny_model
from diffusion_attribution.objective.sweep import per_sample_losses

PAPER_MSCOCO_FORWARDS = 23.7e6
CONF = __import__("pathlib").Path(__file__).resolve().parents[1] / "conf"


def forward_flops(unet: torch.nn.Module, sample: torch.Tensor, text: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(sample, torch.zeros(sample.shape[0], dtype=torch.long), encoder_hidden_states=text)
    return counter.get_total_flops() / sample.shape[0]


def where_time_goes(unet: torch.nn.Module, sample: torch.Tensor, text: torch.Tensor, top: int = 8) -> None:
    """The operators that take the UNet forward's CPU time (torch.profiler, self time)."""
    from torch.profiler import ProfilerActivity, profile

    timesteps = torch.full((sample.shape[0],), 500, dtype=torch.long)
    with torch.no_grad():
        unet(sample, timesteps, encoder_hidden_states=text)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                unet(sample, timesteps, encoder_hidden_states=text)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    shares = ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in events[:top])
    print(f"where a forward's time goes (self CPU time): {shares}")


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ids", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-coco", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("attribute", overrides=["model.path=unused"])
    datamodule = ShapesDataModule(cache_dir=cfg.data.cache_dir)
    model_cfg = {k: cfg.model[k] for k in ("unet", "text_encoder", "scheduler", "max_length", "resolution")}
    model = build_tiny_model(datamodule.source.all_captions(), **model_cfg).eval()
    dataset = datamodule.full_dataset()
    method = cfg.method
    num_t = int(model.scheduler.config.num_train_timesteps)
    timesteps = list(range(0, num_t, num_t // method.num_timesteps))[: method.num_timesteps]
    ids = list(range(args.ids))
    per_sample_losses(model, dataset, ids[:8], timesteps[:1], [0], [False], batch_size=8)  # warm-up
    started = time.perf_counter()
    per_sample_losses(model, dataset, ids, timesteps, [0], [False], batch_size=args.batch_size)
    elapsed = time.perf_counter() - started
    forwards = len(ids) * len(timesteps)
    rate = forwards / elapsed
    sample = torch.randn(args.batch_size, *model.latent_shape)
    text = torch.randn(args.batch_size, model.max_length, model.text_encoder.config.hidden_size)
    flops = forward_flops(model.unet, sample, text)
    peak = matmul_gflops()
    captions = (
        3
        if method.captions == "all"
        else len(method.captions)
        if not isinstance(method.captions, int)
        else method.captions
    )
    per_query = datamodule.num_examples * len(timesteps) * captions / rate
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"tiny UNet: {flops / 1e6:.1f} MFLOP per forward (32x32, batch {args.batch_size})")
    print(
        f"sweep: {forwards} forwards in {elapsed:.1f} s = {rate:.0f} forwards/s = {rate * flops / 1e9:.1f} GFLOP/s"
    )
    print(
        f"plain 1024^3 float32 matmul: {peak:.1f} GFLOP/s -> sweep at {100 * rate * flops / 1e9 / peak:.0f}% of it"
    )
    print(
        f"one query's sweep on the default ({datamodule.num_examples} ids x {len(timesteps)} timesteps x "
        f"{captions} captions): {per_query:.0f} s"
    )
    where_time_goes(model.unet, sample, text)
    if args.skip_coco:
        return
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        coco = compose("train", overrides=["model=coco_ldm"]).model
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=16, **coco.unet).eval()
    batch = 8
    latents = torch.randn(batch, 4, 16, 16)
    text = torch.randn(batch, 77, 1024)
    coco_flops = forward_flops(unet, latents, text)
    with torch.no_grad():
        unet(latents, torch.zeros(batch, dtype=torch.long), encoder_hidden_states=text)
        started = time.perf_counter()
        for _ in range(3):
            unet(latents, torch.full((batch,), 500), encoder_hidden_states=text)
    per_forward = (time.perf_counter() - started) / (3 * batch)
    print(
        f"coco_ldm UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M params, "
        f"{coco_flops / 1e9:.2f} GFLOP per forward; {per_forward * 1e3:.0f} ms per forward here "
        f"({coco_flops / per_forward / 1e9:.1f} GFLOP/s)"
    )
    print(
        f"paper's MSCOCO sweep (23.7M forwards) projected here: {PAPER_MSCOCO_FORWARDS * per_forward / 3600:.0f} h; "
        f"at the matmul-bound rate: {PAPER_MSCOCO_FORWARDS * coco_flops / (peak * 1e9) / 3600:.0f} h"
    )


if __name__ == "__main__":
    main()
