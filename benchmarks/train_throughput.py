"""Training throughput of the default model on the default data, run by hand:

    python benchmarks/train_throughput.py --steps 20 --batch-size 64 --threads 2 [--model tiny] [overrides]

Composes the real train config (extra arguments are Hydra overrides), builds the model and data it
names, and times optimizer steps of DiffusionTrainingModule (loss, backward, gradient clipping, AdamW,
LR schedule, EMA) after a warm-up step, without the Lightning Trainer around them.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir

from diffusion_attribution.models.loading import model_from_config
from diffusion_attribution.training.module import DiffusionTrainingModule

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--model", default="tiny", help="a conf/model/ option")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.num_common=500")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    overrides = [f"model={args.model}", f"data.batch_size={args.batch_size}", *args.overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(cfg.seed)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    model = model_from_config(cfg.model, datamodule.source.all_captions())
    module = DiffusionTrainingModule(model, max_steps=cfg.training.max_steps, **cfg.training.optim)
    optim = module.configure_optimizers()
    optimizer, schedule = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    params = list(module.trainable_parameters())
    batches = itertools.cycle(datamodule.train_dataloader())

    def step() -> float:
        loss = module.training_loss(next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.trainer.gradient_clip_val)
        optimizer.step()
        schedule.step()
        module.ema.step(params)
        return loss.item()

    step()  # warm-up: first-touch allocations and image decoding
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = time.perf_counter() - start

    batch = min(args.batch_size, len(datamodule.dataset))
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    threads = torch.get_num_threads()
    print(f"model={args.model} resolution={model.image_resolution} batch={batch} threads={threads}")
    print(f"parameters: {trainable / 1e6:.2f}M trainable, {total / 1e6:.2f}M total")
    rate = args.steps / elapsed
    print(f"{args.steps} steps in {elapsed:.2f} s: {rate:.2f} steps/s, {rate * batch:.1f} images/s")


if __name__ == "__main__":
    main()
