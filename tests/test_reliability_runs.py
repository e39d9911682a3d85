"""Reliability of runs and caches: damaged shards and curvature files are detected by checksum, a
SIGTERM stops a sweep within one batch, a resumed sweep may change shard_size, a run directory of
another training config is not overwritten, pointless or incomplete configs are refused early, the
formats diffusers itself writes for Custom Diffusion are read, and truncated files are named."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_TRAIN
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
from fixtures_models import write_tiny_sd_components
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from diffusion_attribution.compute.sharded import SweepInterrupted, check_stop, run_sharded, shard_path
from diffusion_attribution.curvature.diagonal import FisherDiagonal
from diffusion_attribution.curvature.ekfac import EKFAC, LinearBlock
from diffusion_attribution.jobs.train import run_training
from diffusion_attribution.models.customization import (
    TOKEN_FILE,
    CustomizationError,
    apply_abc_customization,
    read_kv_weights,
    read_token_embedding,
)
from diffusion_attribution.models.loading import model_from_config
from diffusion_attribution.models.pipeline import CheckpointError, TextToImageModel
from diffusion_attribution.training.fit import RunDirectoryError, claim_run_dir, customize_model, train_model
from diffusion_attribution.utils.atomic import CorruptFileError

SINGLE = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}
IDS = np.arange(10)
BATCH = 2


class Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


class CountingShardFn:
    """A shard function in batches of BATCH, one module call per batch; `on_batch(shard, k)` runs
    before batch k of a shard."""

    def __init__(self, shard_size: int, on_batch=None) -> None:
        self.model, self.shard_size, self.on_batch = Doubler(), shard_size, on_batch
        self.shards: list[int] = []
        self.batches = 0

    def __call__(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        shard = int(ids[0]) // self.shard_size
        self.shards.append(shard)
        out = []
        for k, start in enumerate(range(0, len(ids), BATCH)):
            if self.on_batch is not None:
                self.on_batch(shard, k)
            check_stop()  # the cooperative check (the module call below checks too)
            out.append(self.model(torch.as_tensor(ids[start : start + BATCH], dtype=torch.float32)))
            self.batches += 1
        return {"values": torch.cat(out)}


def sweep(out: Path, shard_size: int = 4, fn: CountingShardFn | None = None, identity=None) -> torch.Tensor:
    fn = fn or CountingShardFn(shard_size)
    shards = run_sharded(fn.model, fn, IDS, out, identity or {"model": "a"}, shard_size, SINGLE, "test")
    return torch.cat([s["values"] for s in shards])


EXPECTED = torch.as_tensor(IDS * 2, dtype=torch.float32)


def zero_in_place(path: Path, keep_header: bool) -> None:
    """Overwrite a file with zeros, same size (the whole file, or only the data after the header)."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little") if keep_header else 0
    data[start:] = bytes(len(data) - start)
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------------------ 1, 7: damaged caches
@pytest.mark.parametrize("damage", ["zeros", "zero_data", "truncated"])
def test_a_damaged_shard_is_recomputed_with_a_warning(damage: str, tmp_path: Path, caplog) -> None:
    out = tmp_path / "sweep"
    torch.testing.assert_close(sweep(out), EXPECTED)
    target = shard_path(out, 1)
    if damage == "truncated":
        truncate(target)
    else:
        zero_in_place(target, keep_header=damage == "zero_data")
    fn = CountingShardFn(4)
    with caplog.at_level(logging.WARNING):
        result = sweep(out, fn=fn)
    torch.testing.assert_close(result, EXPECTED)  # not the zeros
    assert fn.shards == [1]  # only the damaged shard
    assert any(str(target) in r.getMessage() and "recomputing" in r.getMessage() for r in caplog.records)


def fisher_and_ekfac() -> tuple[FisherDiagonal, EKFAC]:
    fisher = FisherDiagonal({"b.weight": torch.rand(3, 2) + 0.1, "a.weight": torch.rand(4) + 0.1}, {"k": 1})
    block = LinearBlock("lin", "lin.weight", None)
    ekfac = EKFAC(
        {"lin": block},
        {"lin": torch.eye(3, dtype=torch.float64)},
        {"lin": torch.eye(2, dtype=torch.float64)},
        {"lin": torch.rand(2, 3, dtype=torch.float64) + 0.1},
        {"num_examples": 5},
    )
    return fisher, ekfac


@pytest.mark.parametrize("damage", ["zeros", "zero_data", "truncated"])
def test_a_damaged_fisher_or_ekfac_file_is_refused_naming_it(damage: str, tmp_path: Path) -> None:
    fisher, ekfac = fisher_and_ekfac()
    for name, obj, cls in (("fisher", fisher, FisherDiagonal), ("ekfac", ekfac, EKFAC)):
        path = obj.save(tmp_path / f"{name}.safetensors")
        loaded = cls.load(path)  # round trip first
        if name == "fisher":
            assert loaded.names == fisher.names and all(
                torch.equal(loaded[n], fisher[n]) for n in fisher.names
            )
        else:
            assert torch.equal(loaded.eigenvalues["lin"], ekfac.eigenvalues["lin"])
        if damage == "truncated":
            truncate(path)
        else:
            zero_in_place(path, keep_header=damage == "zero_data")
        with pytest.raises(CorruptFileError, match=rf"{path}.*corrupt.*Delete it") as info:
            cls.load(path)
        assert "weights_only=False" not in str(info.value)


def test_a_truncated_checkpoint_names_the_component_and_the_fix(tiny_model, tmp_path: Path) -> None:
    folder = tiny_model.save_pretrained(tmp_path / "checkpoint")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    truncate(weights)
    with pytest.raises(
        CheckpointError, match=rf"Cannot load {folder / 'unet'}.*damaged.*export the checkpoint again"
    ):
        TextToImageModel.from_pretrained(folder)


# ------------------------------------------------------------------------------ 2: SIGTERM
def test_sigterm_stops_within_one_batch_and_keeps_finished_shards(tmp_path: Path) -> None:
    out = tmp_path / "sweep"

    def terminate(shard: int, batch: int) -> None:
        if shard == 1 and batch == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler records it

    fn = CountingShardFn(4, on_batch=terminate)
    with pytest.raises(SweepInterrupted, match=r"SIGTERM received: stopped during shard 1.*again to resume"):
        sweep(out, fn=fn)
    assert fn.shards == [0, 1] and fn.batches == 2 + 1  # shard 0's two batches, then one of shard 1
    assert [p.name for p in sorted(out.glob("shard_*"))] == ["shard_000000.safetensors"]  # partial dropped
    assert not list(out.glob(".*.tmp"))
    resumed = CountingShardFn(4)
    torch.testing.assert_close(sweep(out, fn=resumed), EXPECTED)
    assert resumed.shards == [1, 2]


def test_sigterm_stops_a_shard_function_without_its_own_checks(tmp_path: Path) -> None:
    """The module calls of any shard function check for the stop (no cooperation needed)."""
    calls: list[int] = []
    model = Doubler()

    def shard_fn(ids: np.ndarray) -> dict[str, torch.Tensor]:
        out = []
        for k in range(len(ids)):
            if k == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            out.append(model(torch.tensor([float(ids[k])])))
            calls.append(int(ids[k]))
        return {"values": torch.cat(out)}

    with pytest.raises(SweepInterrupted, match="stopped during shard 0"):
        run_sharded(model, shard_fn, IDS, tmp_path / "s", {"m": 1}, 5, SINGLE)
    assert calls == [0]
    assert not list((tmp_path / "s").glob("shard_*"))


# ------------------------------------------------------------------------------ 3: shard_size, identity
def test_a_changed_shard_size_resumes_with_the_finished_shards(tmp_path: Path, caplog) -> None:
    out = tmp_path / "sweep"
    sweep(out, shard_size=4)
    shard_path(out, 2).unlink()  # an unfinished sweep: shards 0 and 1 of 3
    kept = {p: p.stat().st_mtime_ns for p in out.glob("shard_*")}
    fn = CountingShardFn(4)  # the folder's layout is kept
    with caplog.at_level(logging.WARNING):
        result = run_sharded(fn.model, fn, IDS, out, {"model": "a"}, 3, SINGLE, "test")
    torch.testing.assert_close(torch.cat([s["values"] for s in result]), EXPECTED)
    assert fn.shards == [2]  # only what the finished shards lack
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "shard_size 3 -> keeping 4" in message and "another directory" in message


def test_a_different_identity_names_the_keys_that_differ(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    sweep(out, identity={"model": "a", "sweep": {"seed": 1, "t": [1, 2]}})
    fn = CountingShardFn(4)
    with pytest.raises(
        ValueError, match=r"differs in: identity\.model: 'a' -> 'b'; identity\.sweep\.seed: 1 -> 2\)"
    ) as info:
        run_sharded(fn.model, fn, IDS, out, {"model": "b", "sweep": {"seed": 2, "t": [1, 2]}}, 4, SINGLE)
    assert "refusing to mix" in str(info.value) and "t:" not in str(info.value)
    with pytest.raises(ValueError, match=r"ids_sha1: .*num_ids: 10 -> 9"):
        run_sharded(fn.model, fn, IDS[:-1], out, {"model": "a", "sweep": {"seed": 1, "t": [1, 2]}}, 4, SINGLE)
    assert fn.shards == []


# ------------------------------------------------------------------------------ 4, 5: training runs
def test_training_refuses_a_run_dir_of_another_config(hydra_run, shapes_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = [
        *FAST_TRAIN,
        f"data.cache_dir={shapes_cache}",
        "training.max_steps=2",
        "samples.every_n_steps=0",
    ]
    run_training(hydra_run(common, run_dir), run_dir)
    weights = run_dir / "checkpoint" / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    other = hydra_run([*common, "training.optim.lr=0.5"], run_dir)
    with pytest.raises(
        RunDirectoryError,
        match=rf"{run_dir} already holds checkpoint.*training\.optim\.lr: 0\.001 -> 0\.5.*hydra\.run\.dir=",
    ):
        train_model(other, run_dir)
    assert weights.stat().st_mtime_ns == before
    # The same config may resume (training.resume is not a difference); a folder without a record is refused.
    claim_run_dir(hydra_run([*common, f"training.resume={run_dir}"], run_dir), run_dir)
    (run_dir / "train_config.json").unlink()
    with pytest.raises(RunDirectoryError, match=r"no train_config\.json.*hydra\.run\.dir="):
        claim_run_dir(hydra_run(common, run_dir), run_dir)


@pytest.mark.parametrize("steps", [0, -1])
def test_max_steps_below_one_is_refused_before_any_work(steps: int, hydra_run, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = hydra_run(
        [*FAST_TRAIN, f"training.max_steps={steps}", "data.cache_dir=/nonexistent/never"], run_dir
    )
    with pytest.raises(ValueError, match=rf"training\.max_steps={steps}.*at least one optimizer step"):
        train_model(cfg, run_dir)
    custom = hydra_run(
        ["experiment=customize", f"training.max_steps={steps}", "model.path=/nonexistent"], run_dir
    )
    with pytest.raises(ValueError, match=r"training\.max_steps"):
        customize_model(custom, run_dir)
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_a_missing_model_path_is_named() -> None:
    pretrained = OmegaConf.create(
        {
            "_target_": "diffusion_attribution.models.build.load_pretrained_model",
            "_partial_": True,
            "path": None,
            "resolution": 512,
        }
    )
    with pytest.raises(ValueError, match=r"model\.path is not set"):
        model_from_config(pretrained)
    missing = OmegaConf.create({"_target_": "x.y", "path": "???"})
    with pytest.raises(ValueError, match=r"model\.path is not set"):
        model_from_config(missing)
    tiny = OmegaConf.create({"_target_": "diffusion_attribution.models.build.build_tiny_model", "path": None})
    with pytest.raises(ValueError, match=r"model\.path is not set.*train\.py"):
        model_from_config(tiny, require_path=True)
    custom = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "custom_diffusion.yaml")
    custom.base_path = "/some/base"
    with pytest.raises(CustomizationError, match=r"model\.customization is not set"):
        model_from_config(custom)


# ------------------------------------------------------------------------------ 6: customization formats
@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sd_components(tmp_path_factory.mktemp("sd"))


def test_diffusers_save_attn_procs_output_is_read(sd: Path, tmp_path: Path) -> None:
    """The folder diffusers' Custom Diffusion training writes: save_attn_procs(safe_serialization=False)
    with `{}` entries for the weightless attn1 processors, and a token embedding."""
    model = TextToImageModel.from_pretrained(sd)
    unet = model.unet
    processors = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        for name in unet.attn_processors:
            if name.endswith("attn1.processor"):  # as diffusers' train_custom_diffusion.py does
                processors[name] = CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False)
                continue
            block = name.split(".")[0]
            hidden = unet.config.block_out_channels[-1 if block == "mid_block" else int(name.split(".")[1])]
            if block == "up_blocks":
                hidden = list(reversed(unet.config.block_out_channels))[int(name.split(".")[1])]
            processors[name] = CustomDiffusionAttnProcessor(
                train_kv=True,
                train_q_out=False,
                hidden_size=hidden,
                cross_attention_dim=unet.config.cross_attention_dim,
            )
            for layer in (processors[name].to_k_custom_diffusion, processors[name].to_v_custom_diffusion):
                nn.init.normal_(layer.weight)
    unet.set_attn_processor(processors)
    folder = tmp_path / "abc_model"
    unet.save_attn_procs(folder, safe_serialization=False)
    saved = torch.load(next(folder.glob("*.bin")), weights_only=True)
    assert any(v == {} for v in saved.values())  # the entries that used to be refused
    width = model.text_encoder.get_input_embeddings().weight.shape[1]
    row = torch.randn(width)
    torch.save({"<new1>": row}, folder / TOKEN_FILE)
    expected = {n: p.detach().clone() for n, p in unet.named_parameters() if "custom_diffusion" in n}
    assert expected

    base = TextToImageModel.from_pretrained(sd)
    apply_abc_customization(base, folder)
    for name, value in expected.items():
        target = name.replace(".processor.to_k_custom_diffusion.", ".to_k.").replace(
            ".processor.to_v_custom_diffusion.", ".to_v."
        )
        assert torch.equal(base.unet.get_parameter(target), value), target
    token_id = base.tokenizer.convert_tokens_to_ids("<new1>")
    assert torch.equal(base.text_encoder.get_input_embeddings().weight[token_id], row)


class NotATensor:
    pass


def test_a_safetensors_token_file_named_bin_is_read(tmp_path: Path) -> None:
    path = tmp_path / TOKEN_FILE
    row = torch.randn(8)
    save_file({"<new1>": row}, str(path), metadata={"format": "pt"})
    assert torch.equal(read_token_embedding(path)["<new1>"], row)
    truncate(path)
    with pytest.raises(CustomizationError, match=rf"{path}.*truncated"):
        read_token_embedding(path)
    pickled = tmp_path / "pytorch_custom_diffusion_weights.bin"
    torch.save({"x": NotATensor()}, pickled)
    with pytest.raises(CustomizationError, match=rf"Cannot read {pickled}") as info:
        read_kv_weights(pickled)
    assert "weights_only=False" not in str(info.value) and "pickled objects" in str(info.value)
