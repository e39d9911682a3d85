"""The real conf/ tree: every group option composes, resolves and instantiates (where it can here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml
from conftest import CONF_DIR, REPO, compose_train, set_hydra_run
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from diffusion_attribution.data.base import CaptionedImageDataModule
from diffusion_attribution.models.loading import model_from_config

# Every option file of these groups is tested (a new file is picked up here automatically).
GROUPS = {
    group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    for group in ("data", "model", "trainer", "logger")
}
DOCUMENTED = {
    "data": ["shapes", "folder", "coco"],
    "model": ["tiny", "coco_ldm", "pretrained"],
    "trainer": ["cpu", "gpu", "ddp"],
    "logger": ["csv", "wandb", "tensorboard"],
}
# Values a user must give on the command line for an option to be complete.
REQUIRED = {
    ("data", "folder"): ["data.root"],
    ("data", "coco"): ["data.root"],
    ("data", "abc"): ["data.root", "data.test_case", "data.pool"],
    ("data", "abc_embedded"): ["data.root", "data.concept"],
    ("data", "exemplars"): ["data.exemplars"],
    ("model", "pretrained"): ["model.path"],
    ("model", "custom_diffusion"): ["model.base_path", "model.customization"],
}
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def resolved(cfg, tmp_path: Path, throw_on_missing: bool = True) -> dict:
    """The job config resolved as in a run writing to tmp_path (`${hydra:...}` included)."""
    job = set_hydra_run(cfg, tmp_path)
    try:
        return OmegaConf.to_container(job, resolve=True, throw_on_missing=throw_on_missing)
    finally:
        HydraConfig.instance().cfg = None


def test_documented_options_exist() -> None:
    """The options train.yaml's usage line promises are there."""
    for group, options in DOCUMENTED.items():
        assert set(options) <= set(GROUPS[group]), group
    launchers = {p.stem for p in (CONF_DIR / "hydra" / "launcher").glob("*.yaml")}
    assert {"local", "slurm"} <= launchers


def test_defaults(tmp_path: Path) -> None:
    cfg = resolved(compose_train(return_hydra_config=True), tmp_path)
    assert cfg["data"]["_target_"].endswith("ShapesDataModule")
    assert cfg["model"]["_target_"].endswith("build_tiny_model")
    assert cfg["trainer"]["accelerator"] == "cpu"
    assert cfg["trainer"]["max_steps"] == cfg["training"]["max_steps"]
    assert cfg["data"]["resolution"] == cfg["model"]["resolution"] == 32
    assert cfg["logger"]["save_dir"] == str(tmp_path)
    assert cfg["samples"]["prompts"] == cfg["data"]["sample_prompts"] and cfg["samples"]["prompts"]


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_option_composes_and_resolves(group: str, option: str, tmp_path: Path) -> None:
    cfg = compose_train([f"{group}={option}"], return_hydra_config=True)
    assert cfg[group]["_target_"]
    required = REQUIRED.get((group, option))
    if required is None:
        values = resolved(cfg, tmp_path)
        assert values["data"]["resolution"] == values["model"]["resolution"]
        return
    with pytest.raises(MissingMandatoryValue) as error:
        resolved(cfg, tmp_path)
    assert any(key in str(error.value) for key in required)  # the message names the full key
    given = compose_train(
        [f"{group}={option}"] + [f"{key}={tmp_path}" for key in required], return_hydra_config=True
    )
    values = OmegaConf.create(resolved(given, tmp_path))
    assert all(OmegaConf.select(values, key) == str(tmp_path) for key in required)


@pytest.mark.parametrize("option", ["coco_ldm", "pretrained"])
def test_paper_models_follow_their_resolution(option: str, tmp_path: Path) -> None:
    cfg = compose_train(
        [f"model={option}", "data=folder", f"data.root={tmp_path}", f"model.path={tmp_path}"],
        return_hydra_config=True,
    )
    values = resolved(cfg, tmp_path)
    assert values["data"]["resolution"] == values["model"]["resolution"] > 32


def test_trainer_options() -> None:
    gpu = compose_train(["trainer=gpu"]).trainer
    assert (gpu.accelerator, gpu.precision) == ("gpu", "bf16-mixed")
    ddp = compose_train(["trainer=ddp"]).trainer
    assert (ddp.strategy, ddp.devices, ddp.accelerator) == ("ddp", 2, "cpu")
    assert ddp.gradient_clip_val == compose_train().trainer.gradient_clip_val  # inherited from cpu


@pytest.mark.parametrize("option", ["cpu", "ddp"])
def test_cpu_trainers_instantiate(option: str, tmp_path: Path) -> None:
    cfg = compose_train([f"trainer={option}", "training.max_steps=7"])
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    assert isinstance(trainer, pl.Trainer)
    assert trainer.max_steps == 7
    assert trainer.num_devices == cfg.trainer.devices


@pytest.mark.parametrize("option", DOCUMENTED["logger"])
def test_loggers_instantiate_into_the_run_dir(option: str, tmp_path: Path) -> None:
    job = set_hydra_run(compose_train([f"logger={option}"], return_hydra_config=True), tmp_path)
    try:
        logger = instantiate(job.logger)
    finally:
        HydraConfig.instance().cfg = None
    assert Path(logger.save_dir) == tmp_path
    if option == "wandb":
        assert job.logger.offline is True  # nothing leaves the machine unless asked


@pytest.mark.parametrize("option", DOCUMENTED["data"])
def test_data_options_instantiate(option: str, tmp_path: Path) -> None:
    overrides = [f"data={option}", "data.exclude=3"]
    if option == "shapes":
        overrides += ["data.num_common=8", "data.images_per_rare_concept=1", f"data.cache_dir={tmp_path}"]
    else:
        overrides.append(f"data.root={tmp_path}")
    datamodule = instantiate(compose_train(overrides).data)
    assert isinstance(datamodule, CaptionedImageDataModule)
    assert datamodule.resolution == 32
    if option == "shapes":  # the others need files on disk (see test_data_folder / test_data_coco)
        assert datamodule.excluded_ids.tolist() == [3]
        assert 3 not in datamodule.train_ids


def test_tiny_model_from_config() -> None:
    cfg = compose_train(["model=tiny"])
    model = model_from_config(cfg.model, ["a red circle on a black background"])
    assert model.image_resolution == cfg.model.resolution
    assert model.max_length == cfg.model.max_length
    assert model.prediction_type == cfg.model.scheduler.prediction_type


def test_pretrained_without_path_names_the_key() -> None:
    cfg = compose_train(["model=pretrained"])
    with pytest.raises(ValueError, match="model.path"):
        model_from_config(cfg.model, [])


@pytest.mark.parametrize("option,launcher", [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_launchers_are_submitit(option: str, launcher: str) -> None:
    cfg = compose_train([f"hydra/launcher={option}"], return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert target == f"hydra_plugins.hydra_submitit_launcher.submitit_launcher.{launcher}"
    assert cfg.hydra.launcher.timeout_min == 240
    if option == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1
        overridden = compose_train(
            ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True
        )
        assert overridden.hydra.launcher.partition == "gpu"


def test_run_dirs_are_unique_per_run() -> None:
    cfg = compose_train(return_hydra_config=True)
    assert "%f" in OmegaConf.to_container(cfg.hydra.run)["dir"]  # microseconds: runs never share one
    assert cfg.hydra.job.chdir is False


@pytest.mark.parametrize(
    "experiment",
    EXPERIMENTS or [pytest.param(None, marks=pytest.mark.skip(reason="conf/experiment/ is empty"))],
)
def test_experiments_compose(experiment: str, tmp_path: Path) -> None:
    cfg = compose_train([f"experiment={experiment}"], return_hydra_config=True)
    values = resolved(cfg, tmp_path, throw_on_missing=False)
    assert values["data"]["resolution"] == values["model"]["resolution"]


def test_train_py_prints_the_job_config() -> None:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run(
        [sys.executable, "train.py", "--cfg", "job", "data=shapes", "model=tiny", "training.max_steps=9"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["data"]["_target_"] == "diffusion_attribution.data.shapes.ShapesDataModule"
    assert printed["model"]["_target_"] == "diffusion_attribution.models.build.build_tiny_model"
    assert printed["training"]["max_steps"] == 9
    assert printed["trainer"]["max_steps"] == "${oc.select:training.max_steps,-1}"


def method_alone(method: str, tmp_path: Path) -> dict:
    """The method's own settings (its `defaults:` inheritance included, no experiment preset)."""
    from compose_jobs import compose_job

    cfg = compose_job("attribute", [f"method={method}", "model.path=x"], tmp_path)
    HydraConfig.instance().cfg = None
    return OmegaConf.to_container(cfg.method)


METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
PRESETS = sorted((p.parent.name, p.stem) for p in (CONF_DIR / "method_preset").glob("*/*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_composes_with_every_experiment(experiment: str, method: str, tmp_path: Path) -> None:
    """An experiment brings its settings for the chosen method only (conf/method_preset/<experiment>/
    <method>.yaml): the method's config never receives another method's keys."""
    from compose_jobs import compose_job

    cfg = compose_job("attribute", [f"experiment={experiment}", f"method={method}", "model.path=x"], tmp_path)
    try:
        plain_method = OmegaConf.to_container(cfg.method, resolve=True)
    finally:
        HydraConfig.instance().cfg = None
    alone = method_alone(method, tmp_path)
    preset_file = CONF_DIR / "method_preset" / experiment / f"{method}.yaml"
    preset = OmegaConf.to_container(OmegaConf.load(preset_file)) if preset_file.is_file() else {}
    assert set(plain_method) == set(alone) | set(preset)
    assert_merged(plain_method, preset)


def assert_merged(merged: dict, preset: dict, where: str = "method") -> None:
    """Every value the preset sets is in the merged config (nested nodes, e.g. the curvature, by key)."""
    for key, value in preset.items():
        if isinstance(value, dict):
            assert_merged(merged[key], value, f"{where}.{key}")
        else:
            assert merged[key] == value, f"{where}.{key}"


@pytest.mark.parametrize(("experiment", "method"), PRESETS)
def test_presets_name_real_settings_and_lose_to_the_command_line(
    experiment: str, method: str, tmp_path: Path
) -> None:
    from compose_jobs import compose_job

    alone = method_alone(method, tmp_path)
    preset = OmegaConf.to_container(
        OmegaConf.load(CONF_DIR / "method_preset" / experiment / f"{method}.yaml")
    )
    assert set(preset) <= set(alone), f"{experiment}/{method} sets keys the method does not have"
    key = sorted(preset)[0]
    cfg = compose_job(
        "attribute",
        [f"experiment={experiment}", f"method={method}", "model.path=x", f"method.{key}=null"],
        tmp_path,
    )
    HydraConfig.instance().cfg = None
    assert cfg.method[key] is None
