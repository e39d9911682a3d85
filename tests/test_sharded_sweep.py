"""The sharded, resumable sweeps (compute/sharded.py, objective/sweep.py): the per-sample losses and the Fisher do
not depend on batch size, shard size or process count, a sweep killed mid-way resumes computing only
the missing shards, and a folder holding another run's shards is refused (one that differs only in its
shard size is resumed in its own)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_WORLD
from ddp_sweep_script import BATCH_SIZE, CONFIG, IDENTITY, IDS, SHARD_SIZE, SUBSET, WORLD, sweep_and_fisher
from safetensors import safe_open
from safetensors.torch import load_file

from diffusion_attribution.compute.sharded import SweepInterrupted, shard_path
from diffusion_attribution.curvature.diagonal import accumulate_fisher, run_fisher
from diffusion_attribution.data.shapes import ShapesDataModule
from diffusion_attribution.models.build import build_tiny_model
from diffusion_attribution.objective import sweep as loss_sweep
from diffusion_attribution.objective.sweep import SweepConfig, per_sample_losses, run_loss_sweep

SINGLE = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


@pytest.fixture(scope="module")
def world(shapes_cache: Path, tiny_model_settings: dict):
    """(model, datamodule): a fresh tiny model (seed 0) on the tiny world, shared by this module."""
    assert WORLD == TINY_WORLD
    datamodule = ShapesDataModule(**TINY_WORLD, cache_dir=str(shapes_cache), batch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_tiny_model(captions=datamodule.source.all_captions(), **tiny_model_settings)
    return model.eval(), datamodule


@pytest.fixture(scope="module")
def reference(world) -> torch.Tensor:
    """Per-sample losses of IDS computed in one call, without any sharding."""
    model, datamodule = world
    return per_sample_losses(
        model,
        datamodule.full_dataset(),
        IDS.tolist(),
        timesteps=CONFIG.timesteps,
        caption_indices=CONFIG.caption_indices,
        flips=CONFIG.flips,
        seed=CONFIG.seed,
        batch_size=64,
    )


def sweep(world, out_dir: Path, batch_size: int = BATCH_SIZE, shard_size: int = 5, **kwargs) -> torch.Tensor:
    model, datamodule = world
    settings = {"config": CONFIG, "identity": IDENTITY, "trainer_kwargs": SINGLE, **kwargs}
    return run_loss_sweep(
        model,
        datamodule.full_dataset(),
        IDS,
        out_dir=out_dir,
        batch_size=batch_size,
        shard_size=shard_size,
        **settings,
    )


def shard_files(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("shard_*.safetensors"))


def test_losses_do_not_depend_on_batch_or_shard_size(world, reference, tmp_path: Path) -> None:
    small = sweep(world, tmp_path / "small", batch_size=3, shard_size=5)
    large = sweep(world, tmp_path / "large", batch_size=16, shard_size=64)
    assert small.shape == (len(IDS), len(CONFIG.caption_indices), len(CONFIG.flips))
    assert small.dtype == torch.float32 and torch.isfinite(small).all()
    torch.testing.assert_close(small, large, atol=1e-6, rtol=0)
    torch.testing.assert_close(small, reference, atol=1e-6, rtol=0)
    assert len(shard_files(tmp_path / "small")) == 5  # ceil(24 / 5)
    assert len(shard_files(tmp_path / "large")) == 1
    # Flipped and unflipped images, and different captions, are different losses.
    assert not torch.allclose(small[..., 0], small[..., 1])
    assert not torch.allclose(small[:, 0], small[:, 1])


class Killed(RuntimeError):
    pass


def counting_losses(monkeypatch, fail_after: int | None = None) -> list[int]:
    """Patch the sweep's per_sample_losses to count calls (one per shard), raising `Killed` on the call
    after `fail_after` as a kill mid-sweep would stop it."""
    calls: list[int] = []

    def wrapped(*args, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise Killed("killed mid-sweep")
        calls.append(len(kwargs.get("ids", args[2])))
        return per_sample_losses(*args, **kwargs)

    monkeypatch.setattr(loss_sweep, "per_sample_losses", wrapped)
    return calls


def test_a_killed_sweep_resumes_with_the_missing_shards(
    world, reference, monkeypatch, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    counting_losses(monkeypatch, fail_after=2)
    with pytest.raises(Killed):
        sweep(world, out, shard_size=5)
    done = shard_files(out)
    assert [p.name for p in done] == ["shard_000000.safetensors", "shard_000001.safetensors"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no half-written files
    mtimes = {p: p.stat().st_mtime_ns for p in done}

    calls = counting_losses(monkeypatch)
    resumed = sweep(world, out, shard_size=5)
    assert calls == [5, 5, 4]  # shards 2, 3, 4 only (24 ids in shards of 5)
    assert {p: p.stat().st_mtime_ns for p in done} == mtimes
    torch.testing.assert_close(resumed, reference, atol=1e-6, rtol=0)

    # A shard lost afterwards is recomputed alone; a complete folder computes nothing.
    shard_path(out, 3).unlink()
    calls = counting_losses(monkeypatch)
    assert torch.equal(sweep(world, out, shard_size=5), resumed)
    assert calls == [5]
    calls = counting_losses(monkeypatch)
    assert torch.equal(sweep(world, out, shard_size=5), resumed)
    assert calls == []


def test_sigterm_stops_the_sweep_within_the_shard_and_it_resumes(
    world, reference, monkeypatch, tmp_path: Path
) -> None:
    """SLURM preemption or `kill`: the shard in progress stops at its next module call (its partial
    work is discarded), the finished shards are kept, and the process exits (SystemExit) with a message
    saying how to resume."""
    calls: list[int] = []

    def terminated_during_second_shard(*args, **kwargs):
        calls.append(len(kwargs.get("ids", args[2])))
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by Lightning's handler, not fatal
        return per_sample_losses(*args, **kwargs)

    monkeypatch.setattr(loss_sweep, "per_sample_losses", terminated_during_second_shard)
    out = tmp_path / "sweep"
    with pytest.raises(SweepInterrupted, match=r"SIGTERM received: stopped during shard 1.*again to resume"):
        sweep(world, out, shard_size=5)
    assert isinstance(SweepInterrupted("x"), SystemExit)
    assert calls == [5, 5]
    assert [p.name for p in shard_files(out)] == ["shard_000000.safetensors"]
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # Lightning restored the handler

    calls.clear()
    monkeypatch.setattr(loss_sweep, "per_sample_losses", per_sample_losses)
    torch.testing.assert_close(sweep(world, out, shard_size=5), reference, atol=1e-6, rtol=0)


def test_a_folder_of_another_run_is_refused(world, monkeypatch, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    first = sweep(world, out, shard_size=8)
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    calls = counting_losses(monkeypatch)
    other_config = SweepConfig(timesteps=(30, 500), caption_indices=CONFIG.caption_indices, seed=CONFIG.seed)
    for change, key in (
        ({"identity": {**IDENTITY, "model": "another model"}}, "identity.model"),
        ({"config": other_config}, r"identity\.sweep\.flips: .*; identity\.sweep\.timesteps"),
    ):
        with pytest.raises(ValueError, match=rf"different run.*differs in: {key}: .*refusing to mix"):
            sweep(world, out, **{"shard_size": 8, **change})
    model, datamodule = world
    with pytest.raises(ValueError, match="different run"):  # other ids
        run_loss_sweep(model, datamodule.full_dataset(), IDS[:-1], CONFIG, out, IDENTITY, shard_size=8)
    assert calls == []  # refused before computing anything
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before  # and nothing touched
    assert json.loads((out / "sweep.json").read_text())["identity"]["sweep"]["timesteps"] == [30, 500, 960]
    assert torch.equal(sweep(world, out, shard_size=8), first)  # the same run still resumes
    # Another shard size is no other run: the folder is used in its own shard size, nothing recomputed.
    assert torch.equal(sweep(world, out, shard_size=6), first)
    assert calls == []


def test_a_folder_of_other_noise_or_precision_is_refused_with_the_fix(
    world, monkeypatch, tmp_path: Path
) -> None:
    """A sweep written with the generator noise (whose sweep.json, like every sweep's before the counter
    noise, records no 'noise') is never resumed with the counter noise, nor the other way round, and
    the refusal names method.noise; the same for the precision."""
    generator = replace(CONFIG, noise="generator")
    counter = replace(CONFIG, noise="counter")
    assert CONFIG.noise == "generator"  # the default
    assert "noise" not in generator.to_dict() and "precision" not in generator.to_dict()  # the old keys
    assert counter.to_dict()["noise"] == "counter"
    out = tmp_path / "sweep"
    old = sweep(world, out, shard_size=8, config=generator)
    calls = counting_losses(monkeypatch)
    with pytest.raises(ValueError, match=r"identity\.sweep\.noise: \(absent\) -> 'counter'.*method\.noise"):
        sweep(world, out, shard_size=8, config=counter)
    with pytest.raises(
        ValueError, match=r"identity\.sweep\.precision: \(absent\) -> 'bf16'.*method\.precision"
    ):
        sweep(world, out, shard_size=8, config=replace(generator, precision="bf16"))
    with pytest.raises(
        ValueError, match=r"identity\.sweep\.inputs: \(absent\) -> 'bfloat16'.*method\.input_cache_dtype"
    ):
        sweep(world, out, shard_size=8, config=replace(generator, inputs="bfloat16"))
    assert "inputs" not in generator.to_dict()  # float32 inputs keep the old keys
    assert calls == []
    assert torch.equal(sweep(world, out, shard_size=8, config=generator), old)  # its own settings resume it
    new = tmp_path / "counter"
    sweep(world, new, shard_size=8, config=counter)
    with pytest.raises(ValueError, match=r"identity\.sweep\.noise: 'counter' -> \(absent\).*method\.noise"):
        sweep(world, new, shard_size=8, config=generator)
    with pytest.raises(ValueError, match="Unknown noise='philox'"):
        replace(CONFIG, noise="philox")
    with pytest.raises(ValueError, match="Unknown inputs='float16'.*bfloat16"):
        replace(CONFIG, inputs="float16")


def test_fisher_shards_sum_to_the_whole(world, tmp_path: Path) -> None:
    model, datamodule = world
    kwargs = {"batch_size": BATCH_SIZE, "seed": CONFIG.seed, "trainer_kwargs": SINGLE}
    fisher = run_fisher(
        model, datamodule.dataset, IDS, SUBSET, tmp_path / "f", IDENTITY, shard_size=5, **kwargs
    )
    whole = accumulate_fisher(
        model, datamodule.dataset, IDS.tolist(), SUBSET, batch_size=8, seed=CONFIG.seed, progress=False
    ).finalize()
    assert sorted(fisher.names) == sorted(whole.names) and len(shard_files(tmp_path / "f")) == 5
    for name in whole.names:
        torch.testing.assert_close(fisher[name], whole[name], rtol=1e-5, atol=0)
    assert fisher.metadata["num_examples"] == len(IDS)
    assert fisher.mean() > 0


def test_ddp_on_two_processes_matches_one(world, shapes_cache: Path, tmp_path: Path) -> None:
    """run_loss_sweep and run_fisher with trainer devices=2, strategy=ddp (gloo) launched from a script
    give what one process gives, and each process gets the full result back."""
    model, _ = world
    checkpoint = model.save_pretrained(tmp_path / "model")
    one_losses, one_fisher = sweep_and_fisher(checkpoint, shapes_cache, tmp_path / "one", SINGLE)

    out = tmp_path / "two"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    script = REPO / "tests" / "ddp_sweep_script.py"
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint), str(shapes_cache), str(out), "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    computed: dict[str, list[int]] = {"sweep": [], "fisher": []}
    for rank in (0, 1):
        path = out / f"result_rank{rank}.safetensors"
        with safe_open(str(path), framework="pt") as handle:
            info = json.loads(handle.metadata()["info"])
        assert info["world_size"] == 2 and info["rank"] == rank
        tensors = load_file(path)
        torch.testing.assert_close(tensors["losses"], one_losses, atol=1e-6, rtol=0)
        for name, value in one_fisher.items():
            torch.testing.assert_close(tensors[f"fisher.{name}"], value, rtol=1e-6, atol=0)
        for what in computed:
            mine = [s for s in tensors[f"computed.{what}"].tolist() if s >= 0]
            assert mine, f"rank {rank} computed no {what} shard: the work was not shared"
            computed[what] += mine
    num_shards = -(-len(IDS) // SHARD_SIZE)
    for what, shards in computed.items():
        assert sorted(set(shards)) == list(range(num_shards)), what
        assert len(shard_files(out / what)) == num_shards
