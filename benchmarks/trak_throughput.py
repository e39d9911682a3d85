"""How fast are the TRAK-style train sides (method=trak|dtrak|journeytrak) on this machine?

    python benchmarks/trak_throughput.py [--ids 32] [--batch-size 64] [--threads 1]
                                         [--subsets kv,attn,all] [--dims 2048,4096,8192] [--skip-coco]

Prints, for the default tiny model (conf/model/tiny.yaml, random init) on the default world:
- exact per-sample gradient points/s for each weight subset (hooked Linear path where the subset is
  Linear-only, vmap otherwise), and the projected time of the whole train side (every example x the
  default 10 timesteps x 1 caption);
- projection throughput (examples/s) for each k, and the store size;
and for the paper's MSCOCO UNet (conf/model/coco_ldm.yaml, random init, text states of width 1024),
the cost of one per-sample K/V gradient here and the projected CPU time of the 118,287 x 10-point
train side (a GPU job in practice).
"""

from __future__ import annotations

import argparse
import time

import torch
from hydra import compose, initialize_config_dir

from diffusion_attribution.autograd.output_gradients import (
    per_sample_output_gradients,
    resolve_method,
    training_gradient_means,
)
from diffusion_attribution.autograd.projection import BlockwiseProjection
from diffusion_attribution.data.shapes import ShapesDataModule
from diffusion_attribution.models.build import build_tiny_model
from diffusion_attribution.models.weight_subsets import count_parameters, select_parameters
from diffusion_attribution.objective.loss import evaluation_mode

CONF = __import__("pathlib").Path(__file__).resolve().parents[1] / "conf"
DEFAULT_POINTS_PER_EXAMPLE = 10  # conf/method/trak.yaml: 10 timesteps x 1 caption x no flips
MSCOCO_EXAMPLES = 118_287


def tiny_model(captions: list[str]) -> torch.nn.Module:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny"]).model
    settings = {k: v for k, v in cfg.items() if k not in ("_target_", "_partial_", "path")}
    torch.manual_seed(0)
    return build_tiny_model(captions=captions, **settings).eval()


def gradient_rate(model, dataset, ids, subset: str, batch_size: int) -> tuple[float, str, int]:
    params = select_parameters(model.unet, subset)
    method = resolve_method(model.unet, params, "auto")
    timesteps = list(range(0, 1000, 100))
    with evaluation_mode(model):
        training_gradient_means(model, dataset, ids[:2], params, "loss", timesteps[:2], [0])  # warm up
        started = time.perf_counter()
        training_gradient_means(model, dataset, ids, params, "loss", timesteps, [0], batch_size=batch_size)
    points = len(ids) * len(timesteps)
    return points / (time.perf_counter() - started), method, count_parameters(params)


def projection_rate(shapes: dict, dim: int, batch: int) -> float:
    projection = BlockwiseProjection(shapes, dim)
    gradients = {n: torch.randn(batch, *s, dtype=torch.float64) for n, s in shapes.items()}
    started = time.perf_counter()
    projection.project(gradients)
    return batch / (time.perf_counter() - started)


def coco_gradient_seconds(batch: int) -> tuple[float, int]:
    from diffusers import UNet2DConditionModel

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        coco = compose("train", overrides=["model=coco_ldm"]).model
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**coco.unet, sample_size=16).eval()
    params = select_parameters(unet, "kv")
    noisy = torch.randn(batch, 4, 16, 16)
    text = torch.randn(batch, 77, 1024)
    t = torch.randint(0, 1000, (batch,))
    args = (unet, params, noisy, t, text, "loss", torch.randn_like(noisy))
    per_sample_output_gradients(*args[:2], noisy[:1], t[:1], text[:1], "loss", args[-1][:1])  # warm up
    started = time.perf_counter()
    per_sample_output_gradients(*args)
    return (time.perf_counter() - started) / batch, count_parameters(params)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ids", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--subsets", default="kv,attn,all")
    parser.add_argument("--dims", default="2048,4096,8192")
    parser.add_argument("--skip-coco", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = ShapesDataModule()
    model = tiny_model(data.source.all_captions())
    dataset = data.full_dataset()
    ids = list(range(0, data.num_examples, max(1, data.num_examples // args.ids)))[: args.ids]
    print(f"tiny model, {data.num_examples} examples, {args.threads} thread(s), batch {args.batch_size}")
    for subset in args.subsets.split(","):
        rate, method, weights = gradient_rate(model, dataset, ids, subset, args.batch_size)
        total = data.num_examples * DEFAULT_POINTS_PER_EXAMPLE / rate
        print(
            f"  gradients {subset:>4} ({weights:>7,} weights, {method}): {rate:7.1f} points/s -> "
            f"train side {total / 60:.1f} min"
        )
    shapes = {n: tuple(p.shape) for n, p in select_parameters(model.unet, "kv").items()}
    for dim in (int(d) for d in args.dims.split(",")):
        rate = projection_rate(shapes, dim, 256)
        mb = data.num_examples * dim * 4 / 2**20
        print(
            f"  projection kv -> {dim}: {rate:7.1f} examples/s (256 per pass) -> {data.num_examples / rate:.1f} s; "
            f"store {mb:.1f} MB + factor {dim * dim * 8 / 2**20:.0f} MB"
        )
    if not args.skip_coco:
        seconds, weights = coco_gradient_seconds(4)
        total_h = seconds * MSCOCO_EXAMPLES * DEFAULT_POINTS_PER_EXAMPLE / 3600
        print(
            f"coco_ldm UNet: one per-sample K/V gradient ({weights:,} weights) {seconds:.2f} s here -> the "
            f"118,287 x 10-point train side ~{total_h:,.0f} CPU-hours at this rate"
        )


if __name__ == "__main__":
    main()
