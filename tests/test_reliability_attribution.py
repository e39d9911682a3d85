"""Reliability of attribution runs on tiny data: every method setting is checked for type and range
(naming the key and the range) before any work; non-finite scores are never written nor read; runs
record the model's and the data's fingerprints and runs of different models are not compared as one;
a checkpoint is attributed only against its own kind of training data and its own exclusions; the AbC
unlearning preset scores both flips as upstream."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytest
from compose_jobs import compose_job
from conftest import TINY_WORLD, compose_train
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from diffusion_attribution.attribution.checks import TrainingDataMismatchError, check_training_data
from diffusion_attribution.attribution.outputs import NonFiniteScoresError
from diffusion_attribution.attribution.random_ranking import RandomAttributor
from diffusion_attribution.attribution.trak.attributor import JourneyTRAKAttributor, TRAKAttributor
from diffusion_attribution.attribution.unlearning.attributor import UnlearningAttributor
from diffusion_attribution.evaluation.leave_k_out.runs import LeaveKOutError, load_attribution_runs
from diffusion_attribution.evaluation.retrieval import (
    AttributionRunError,
    check_same_model,
    load_attribution_run,
)
from diffusion_attribution.jobs import attribute as job
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.utils.fingerprint import data_fingerprint, model_fingerprint

PROMPT = "a striped red square on a gray background"


@pytest.fixture(autouse=True)
def clear_hydra():
    yield
    HydraConfig.instance().cfg = None


# ------------------------------------------------------------------------- 1. method settings
BAD_SETTINGS = [
    ({"num_timesteps": -1}, r"method.num_timesteps must be an integer of at least 1, got -1"),
    ({"num_timesteps": 0}, r"method.num_timesteps must be an integer of at least 1, got 0"),
    ({"flips": ["maybe"]}, r"method.flips must be auto .* list of booleans.*got \['maybe'\]"),
    ({"flips": "yes"}, r"method.flips must be auto .*got 'yes'"),
    ({"flips": []}, r"method.flips must be auto"),
    ({"captions": 0}, r"method.captions must be all, a positive count"),
    ({"captions": [-1]}, r"method.captions must be all, a positive count .*indices >= 0"),
    ({"captions": "some"}, r"method.captions must be all"),
    ({"timesteps": []}, r"method.timesteps must be null .* non-empty list"),
    ({"timesteps": [10, -5]}, r"method.timesteps must list integer timesteps >= 0; \[-5\]"),
    ({"timesteps": [1.5]}, r"method.timesteps must list integer timesteps >= 0; \[1.5\]"),
    ({"batch_size": 0}, r"method.batch_size must be an integer of at least 1, got 0"),
    ({"batch_size": True}, r"method.batch_size must be an integer of at least 1, got True"),
    ({"shard_size": 2.5}, r"method.shard_size must be an integer of at least 1, got 2.5"),
]
UNLEARNING_ONLY = [
    ({"steps": 0}, r"method.steps must be an integer of at least 1, got 0"),
    ({"step_size": 0}, r"method.step_size must be a positive finite number, got 0"),
    ({"step_size": float("nan")}, r"method.step_size must be a positive finite number, got nan"),
    ({"step_size": "big"}, r"method.step_size must be a positive finite number, got 'big'"),
    ({"num_samples": -3}, r"method.num_samples must be an integer of at least 1, got -3"),
    ({"chunk_size": "a"}, r"method.chunk_size must be an integer of at least 1, got 'a'"),
    ({"target_loss_rise": float("inf")}, r"method.target_loss_rise must be a positive fraction.*null keeps"),
    ({"num_train": -1}, r"method.num_train must be a positive finite number"),
    ({"noise": "philox"}, r"Unknown method.noise='philox'; options: counter \| generator"),
    ({"compile": "yes"}, r"method.compile must be true or false, got 'yes'"),
    ({"attention": "xformers"}, r"Unknown method.attention='xformers'; options: default \| math"),
    ({"input_cache_dtype": "int8"}, r"Unknown method.input_cache_dtype='int8'; options: float32 \| bfloat16"),
    (
        {"input_cache": False, "input_cache_dtype": "bfloat16"},
        r"method.input_cache_dtype=bfloat16 needs method.input_cache=true",
    ),
]
TRAK_ONLY = [
    ({"projection_dim": 0}, r"method.projection_dim must be an integer of at least 1, got 0"),
    ({"damping": -1.0}, r"method.damping \(λ\) must be positive and finite, got -1.0"),
    ({"block_rows": "x"}, r"method.block_rows must be an integer of at least 1"),
]


@pytest.mark.parametrize("settings,message", BAD_SETTINGS + UNLEARNING_ONLY)
def test_unlearning_refuses_bad_settings_by_key_and_range(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UnlearningAttributor(**settings)


@pytest.mark.parametrize("settings,message", BAD_SETTINGS + TRAK_ONLY)
def test_trak_refuses_bad_settings_by_key_and_range(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TRAKAttributor(**settings)


def test_journeytrak_refuses_a_negative_query_timestep() -> None:
    with pytest.raises(ValueError, match=r"method.query_timestep must be an integer of at least 0, got -1"):
        JourneyTRAKAttributor(query_timestep=-1)


def test_good_settings_arrive_as_plain_values() -> None:
    """Hydra's ListConfig lists and integral floats are read as what they say."""
    method = UnlearningAttributor(
        flips=OmegaConf.create([False, True]), captions=OmegaConf.create([0, 2]), batch_size=8.0
    )
    assert method.flips == [False, True] and method.captions == [0, 2] and method.batch_size == 8
    assert UnlearningAttributor(captions="all", flips="auto").captions == "all"


def test_settings_the_model_or_data_cannot_honour(tiny_model: TextToImageModel, shapes) -> None:
    num_t = int(tiny_model.scheduler.config.num_train_timesteps)
    most = max(len(shapes.source.captions(i)) for i in range(len(shapes.source)))
    for method in (UnlearningAttributor, TRAKAttributor):
        with pytest.raises(ValueError, match=rf"more than {most} caption\(s\).*count in \[1, {most}\]"):
            method(captions=most + 2).check_settings(tiny_model, shapes)
        with pytest.raises(ValueError, match=rf"method.captions=\[0, {most}\].*indices in \[0, {most - 1}\]"):
            method(captions=[0, most]).check_settings(tiny_model, shapes)
        with pytest.raises(ValueError, match=rf"method.num_timesteps={num_t + 1}.* in \[1, {num_t}\]"):
            method(num_timesteps=num_t + 1).check_settings(tiny_model, shapes)
        with pytest.raises(
            ValueError, match=rf"method.timesteps: \[{num_t}\] are outside \[0, {num_t - 1}\]"
        ):
            method(timesteps=[0, num_t]).check_settings(tiny_model, shapes)
        method(captions=most, num_timesteps=num_t).check_settings(tiny_model, shapes)


# ---------------------------------------------------------------------------- the job (tiny model)
@pytest.fixture
def tiny_checkpoint(tiny_model: TextToImageModel, tmp_path: Path) -> Path:
    return tiny_model.save_pretrained(tmp_path / "model")


def tiny_attribute_cfg(checkpoint: Path, run_dir: Path, shapes_cache: Path, *overrides: str) -> Any:
    base = [
        f"model.path={checkpoint}",
        *(f"data.{k}={v}" for k, v in TINY_WORLD.items()),
        f"data.cache_dir={shapes_cache}",
        f"cache_dir={run_dir.parent / 'cache'}",
        f"query.prompts=['{PROMPT}']",
        "query.seeds=[0]",
        "query.sampler.num_steps=2",
        "trainer.enable_progress_bar=false",
        "top_k=3",
    ]
    return compose_job("attribute", [*base, *overrides], run_dir)


def test_too_many_captions_is_refused_before_any_query(
    tiny_checkpoint: Path, shapes_cache: Path, monkeypatch, tmp_path: Path
) -> None:
    def no_queries(*args, **kwargs):
        raise AssertionError("queries were generated before the method's settings were checked")

    monkeypatch.setattr(job, "build_queries", no_queries)
    run_dir = tmp_path / "run"
    cfg = tiny_attribute_cfg(tiny_checkpoint, run_dir, shapes_cache, "method.captions=5")
    with pytest.raises(ValueError, match=r"method.captions=5: no example of this data has more than \d"):
        job.run_attribution(cfg, run_dir)
    assert not (run_dir / "attribution_run.json").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("top_k", ["0", "-2", "abc"])
def test_a_bad_top_k_is_refused_before_the_method_is_built(
    tiny_checkpoint: Path, shapes_cache: Path, monkeypatch, tmp_path: Path, top_k: str
) -> None:
    def no_method(*args, **kwargs):
        raise AssertionError("the method was built before top_k was checked")

    monkeypatch.setattr(job.hydra.utils, "instantiate", no_method)
    run_dir = tmp_path / "run"
    cfg = tiny_attribute_cfg(tiny_checkpoint, run_dir, shapes_cache, f"top_k={top_k}")
    with pytest.raises(ValueError, match=r"top_k must be an integer of at least 1"):
        job.run_attribution(cfg, run_dir)


def test_bad_flips_from_the_command_line_fail_before_any_work(
    tiny_checkpoint: Path, shapes_cache: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    cfg = tiny_attribute_cfg(tiny_checkpoint, run_dir, shapes_cache, "method.flips=[maybe]")
    with pytest.raises(InstantiationException, match=r"method.flips must be auto"):
        job.run_attribution(cfg, run_dir)
    assert not (run_dir / "attribution_run.json").exists()


def test_non_finite_scores_are_never_written(
    tiny_checkpoint: Path, shapes_cache: Path, monkeypatch, tmp_path: Path
) -> None:
    def nan_scores(self, queries):
        scores = np.zeros((len(queries), self.num_examples), dtype=np.float32)
        scores[0, 5] = np.nan
        return scores

    monkeypatch.setattr(RandomAttributor, "score", nan_scores)
    run_dir = tmp_path / "run"
    cfg = tiny_attribute_cfg(tiny_checkpoint, run_dir, shapes_cache, "method=random")
    with pytest.raises(
        NonFiniteScoresError, match=rf"method=random gave NaN or inf scores for query 0 \('{PROMPT}'\)"
    ):
        job.run_attribution(cfg, run_dir)
    assert not (run_dir / "scores.npy").exists() and not (run_dir / "ranking.json").exists()


def test_ranking_records_the_model_and_data_fingerprints(
    tiny_checkpoint: Path, shapes_cache: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    cfg = tiny_attribute_cfg(tiny_checkpoint, run_dir, shapes_cache, "method=random")
    job.run_attribution(cfg, run_dir)
    ranking = json.loads((run_dir / "ranking.json").read_text())
    assert ranking["model_fingerprint"] == model_fingerprint(
        TextToImageModel.from_pretrained(tiny_checkpoint)
    )
    datamodule = hydra.utils.instantiate(cfg.data)
    assert ranking["data_fingerprint"] == data_fingerprint(datamodule)
    scores, loaded = load_attribution_run(run_dir, datamodule.num_examples)
    assert loaded["model_fingerprint"] == ranking["model_fingerprint"] and np.isfinite(scores).all()


# ------------------------------------------------------------------ 2./3. reading and comparing runs
def fake_run(
    path: Path, scores: np.ndarray, model: str = "/models/a", fingerprint: str | None = "f1", data: str = "d1"
) -> Path:
    path.mkdir(parents=True)
    np.save(path / "scores.npy", scores.astype(np.float32))
    ranking: dict[str, Any] = {
        "method": "random",
        "model": model,
        "queries": [{"prompt": f"q{k}", "seed": k, "caption": f"q{k}"} for k in range(len(scores))],
    }
    if fingerprint is not None:
        ranking.update(model_fingerprint=fingerprint, data_fingerprint=data)
    (path / "ranking.json").write_text(json.dumps(ranking))
    return path


def test_a_run_with_nan_scores_is_refused(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "nan", np.full((2, 6), np.nan))
    with pytest.raises(
        AttributionRunError, match=r"nan/scores.npy holds 12 NaN or inf values.*Rerun attribute.py"
    ):
        load_attribution_run(run, 6)
    with pytest.raises(LeaveKOutError, match=r"holds 12 NaN or inf values"):
        load_attribution_runs([run])


def test_a_truncated_scores_file_is_named(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "cut", np.ones((2, 600)))
    data = (run / "scores.npy").read_bytes()
    (run / "scores.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        AttributionRunError, match=r"cut/scores.npy cannot be read .* truncated.*Rerun attribute.py"
    ):
        load_attribution_run(run, 600)
    with pytest.raises(LeaveKOutError, match=r"cut/scores.npy cannot be read"):
        load_attribution_runs([run])


def test_two_models_saved_at_one_path_are_not_compared(tmp_path: Path) -> None:
    scores = np.random.default_rng(0).normal(size=(2, 6))
    a = fake_run(tmp_path / "a", scores, fingerprint="f1")
    b = fake_run(tmp_path / "b", scores, fingerprint="f2")
    rankings = [load_attribution_run(d, 6)[1] for d in (a, b)]
    with pytest.raises(
        AttributionRunError, match=r"b attributed another model .*both name the model path /models/a"
    ):
        check_same_model(rankings, [a, b])
    with pytest.raises(LeaveKOutError, match=r"another model .*evaluate runs of one model together"):
        load_attribution_runs([a, b])
    c = fake_run(tmp_path / "c", scores, fingerprint="f1", data="d2")
    with pytest.raises(AttributionRunError, match=r"c attributed another data"):
        check_same_model([rankings[0], load_attribution_run(c, 6)[1]], [a, c])
    same = fake_run(tmp_path / "same", scores, fingerprint="f1")
    check_same_model([rankings[0], load_attribution_run(same, 6)[1]], [a, same])
    assert [r.model_fingerprint for r in load_attribution_runs([a, same])] == ["f1", "f1"]


def test_old_runs_without_fingerprints_warn(tmp_path: Path, caplog) -> None:
    scores = np.random.default_rng(0).normal(size=(2, 6))
    old = fake_run(tmp_path / "old", scores, fingerprint=None)
    new = fake_run(tmp_path / "new", scores, fingerprint="f1")
    with caplog.at_level(logging.WARNING):
        rankings = [load_attribution_run(d, 6)[1] for d in (old, new)]
        check_same_model(rankings, [old, new])
        load_attribution_runs([old, new])
    assert "records no model fingerprint" in caplog.text


# ------------------------------------------------------------------------ 4. the training data
def write_training_config(folder: Path, *overrides: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    trained = compose_train(["data=shapes", *overrides]).data
    OmegaConf.save(
        OmegaConf.create({"data": OmegaConf.to_container(trained, resolve=True)}),
        folder / "training_config.yaml",
    )
    return folder


def test_data_of_another_kind_is_refused(tmp_path: Path) -> None:
    checkpoint = write_training_config(tmp_path / "model")
    folder_data = compose_train(["data=folder", f"data.root={tmp_path / 'images'}"]).data
    with pytest.raises(
        TrainingDataMismatchError,
        match=r"trained on data=shapes \(.*ShapesDataModule\) but data= here is data=folder .*data=shapes .*data.num_common=1000",
    ):
        check_training_data(checkpoint, folder_data)


def test_a_leave_k_out_checkpoint_needs_its_exclusion(tmp_path: Path) -> None:
    checkpoint = write_training_config(tmp_path / "model", "data.exclude=[3,5,9]")
    plain = compose_train(["data=shapes"]).data
    with pytest.raises(
        TrainingDataMismatchError, match=r"was trained without 3 example\(s\) .*add: data.exclude=\[3,5,9\]$"
    ):
        check_training_data(checkpoint, plain)
    with pytest.raises(TrainingDataMismatchError, match=r"add: data.exclude=\[3,5,9\]$"):
        check_training_data(checkpoint, compose_train(["data=shapes", "data.exclude=[3,5]"]).data)
    check_training_data(checkpoint, compose_train(["data=shapes", "data.exclude=[9,5,3]"]).data)
    ids = tmp_path / "ids.txt"
    ids.write_text("3\n5\n9\n")
    check_training_data(checkpoint, compose_train(["data=shapes", f"data.exclude={ids}"]).data)
    # loader-only settings stay exempt
    check_training_data(
        checkpoint, compose_train(["data=shapes", "data.exclude=[3,5,9]", "data.batch_size=3"]).data
    )


def test_a_checkpoint_trained_on_every_example_refuses_an_exclusion(tmp_path: Path) -> None:
    checkpoint = write_training_config(tmp_path / "model")
    with pytest.raises(TrainingDataMismatchError, match=r"was trained on every example.*remove data.exclude"):
        check_training_data(checkpoint, compose_train(["data=shapes", "data.exclude=[1]"]).data)


def test_an_exclusion_file_is_named_in_the_fix(tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("4\n")
    checkpoint = write_training_config(tmp_path / "model", f"data.exclude={ids}")
    with pytest.raises(TrainingDataMismatchError, match=rf'add: data.exclude="{ids}"$'):
        check_training_data(checkpoint, compose_train(["data=shapes"]).data)


# --------------------------------------------------------------------------------- 5. the preset
def test_the_abc_unlearning_preset_scores_both_flips_as_upstream(tmp_path: Path) -> None:
    cfg = compose_job("attribute", ["experiment=abc", "method=unlearning", "model.path=x"], tmp_path)
    assert list(cfg.method.flips) == [False, True] and cfg.method.flip_reduction == "max"


def test_the_device_follows_the_trainer_config(monkeypatch) -> None:
    from omegaconf import OmegaConf

    from diffusion_attribution.jobs.attribute import inference_device

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert inference_device(OmegaConf.create({"trainer": {"accelerator": "cpu"}})).type == "cpu"
    assert inference_device(OmegaConf.create({"trainer": {"accelerator": "gpu"}})).type == "cuda"
    assert inference_device(OmegaConf.create({"trainer": {"accelerator": "auto"}})).type == "cuda"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(RuntimeError, match="trainer.accelerator=gpu but no CUDA device.*trainer=cpu"):
        inference_device(OmegaConf.create({"trainer": {"accelerator": "gpu"}}))


def test_a_seed_that_is_not_an_integer_names_the_key() -> None:
    from omegaconf import OmegaConf

    from diffusion_attribution.attribution.queries import QueryError, query_specs

    for bad in ("abc", 1.5, -1, True):
        cfg = OmegaConf.create({"prompts": ["a red circle"], "seeds": [bad]})
        with pytest.raises(QueryError, match=r"query.seeds entry 0 is .* not a sampling seed"):
            query_specs(cfg)
    assert query_specs(OmegaConf.create({"prompts": ["a red circle"], "seeds": [3]}))[0]["seed"] == 3


def test_every_job_step_takes_the_trainer_device() -> None:
    """Retrain evaluations and the fidelity benchmark read the device from the trainer config, and
    a sharded sweep without trainer settings stays on the model's device."""
    from diffusion_attribution.compute.devices import device_from_trainer

    assert device_from_trainer(None).type == "cpu"
    assert device_from_trainer({"accelerator": "cpu"}).type == "cpu"
    with pytest.raises(ValueError, match="accelerator='tpu'"):
        device_from_trainer({"accelerator": "tpu"})
    source = Path(__file__).resolve().parents[1] / "src" / "diffusion_attribution"
    offenders = [
        str(p.relative_to(source))
        for p in source.rglob("*.py")
        if "cuda.is_available() else" in p.read_text() and p.name != "devices.py"
    ]
    assert offenders == [], f"device chosen by what is visible, not by the trainer config: {offenders}"
