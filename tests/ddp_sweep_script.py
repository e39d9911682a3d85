"""Run by test_sharded_sweep.py as a subprocess: the loss sweep and the Fisher of a saved tiny model
over a few ids of the tiny shapes world, through `run_loss_sweep` / `run_fisher` with the trainer
settings given on the command line (Lightning's DDP launcher starts the other processes by running
this script again with LOCAL_RANK set).

    python ddp_sweep_script.py <checkpoint> <world cache dir> <out dir> <devices>

Every process writes what it got back, and which shards it computed itself, to
<out dir>/result_rank<rank>.safetensors.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from diffusion_attribution.compute import sharded
from diffusion_attribution.curvature.diagonal import run_fisher
from diffusion_attribution.data.shapes import ShapesDataModule
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.objective.sweep import SweepConfig, run_loss_sweep

# The tiny world of tests/conftest.py (TINY_WORLD); repeated here so the script needs no pytest.
WORLD = {"num_common": 64, "images_per_rare_concept": 4}
IDS = np.arange(1, 96, 4)  # 24 ids: 6 shards of 4, so both processes get work
SHARD_SIZE = 4
BATCH_SIZE = 5
CONFIG = SweepConfig(timesteps=(30, 500, 960), caption_indices=(0, 2), flips=(False, True), seed=7)
IDENTITY = {"model": "tiny", "test": "ddp"}
SUBSET = "kv"


def sweep_and_fisher(
    checkpoint: str | Path, cache_dir: str | Path, out_dir: str | Path, trainer_kwargs: dict
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = TextToImageModel.from_pretrained(checkpoint).eval()
    datamodule = ShapesDataModule(**WORLD, cache_dir=str(cache_dir), batch_size=8)
    out_dir = Path(out_dir)
    losses = run_loss_sweep(
        model,
        datamodule.full_dataset(),
        IDS,
        CONFIG,
        out_dir / "sweep",
        IDENTITY,
        batch_size=BATCH_SIZE,
        shard_size=SHARD_SIZE,
        trainer_kwargs=trainer_kwargs,
    )
    fisher = run_fisher(
        model,
        datamodule.dataset,
        IDS,
        SUBSET,
        out_dir / "fisher",
        IDENTITY,
        batch_size=BATCH_SIZE,
        seed=CONFIG.seed,
        shard_size=SHARD_SIZE,
        trainer_kwargs=trainer_kwargs,
    )
    return losses, fisher.values


def main() -> None:
    torch.set_num_threads(1)
    checkpoint, cache_dir, out_dir, devices = sys.argv[1:5]
    computed: dict[str, list[int]] = {"sweep": [], "fisher": []}
    inner = sharded.ShardedPredictModule.predict_step

    def counting_predict_step(self, batch, batch_idx):  # records the shards this process computes
        todo = [s for s in batch.tolist() if not sharded.shard_path(self.out_dir, s).is_file()]
        computed[self.out_dir.name].extend(todo)
        return inner(self, batch, batch_idx)

    sharded.ShardedPredictModule.predict_step = counting_predict_step
    trainer_kwargs = {
        "accelerator": "cpu",
        "devices": int(devices),
        "strategy": "ddp" if int(devices) > 1 else "auto",
        "enable_progress_bar": False,
    }
    losses, fisher = sweep_and_fisher(checkpoint, cache_dir, out_dir, trainer_kwargs)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    info = {"rank": rank, "world_size": world_size, "local_rank": os.environ.get("LOCAL_RANK")}
    tensors = {"losses": losses, **{f"fisher.{n}": v for n, v in fisher.items()}}
    for name, shards in computed.items():  # -1: safetensors takes no empty tensor
        tensors[f"computed.{name}"] = torch.tensor([*shards, -1], dtype=torch.long)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(Path(out_dir) / f"result_rank{rank}.safetensors"),
        metadata={"info": json.dumps(info)},
    )


if __name__ == "__main__":
    main()
