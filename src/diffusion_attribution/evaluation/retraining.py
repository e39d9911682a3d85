"""Counterfactual retrains as Hydra jobs: plan, key, reuse, resume, launch.

A retrain is the base model's own training job (training/fit.py:train_model, its recipe read from
<checkpoint>/training_config.yaml) with `data.exclude` set to an exclusion set. It is keyed by

    <retrain_dir>/<recipe hash>/<exclusion key>/

where the recipe hash covers what decides the weights (seed, data, model, training, trainer; not
logging, checkpoint cadence or data-loading details) and the exclusion key is `k<size>-<hash of the
sorted ids>`. So the same exclusion set asked for twice (by two queries, two methods, or the
leave-K-out and LDS benchmarks) trains once; a finished retrain (its `retrain.json` written after the
checkpoint) is reused; an interrupted one resumes from its `checkpoints/last.ckpt`. Retrains always
run with `training.example_keyed_rng=true`: resumption is then exact, and a base model trained with it
shares its random numbers with every retrain (training/keyed.py).

Jobs are launched through the launcher of the evaluate.py run (`hydra/launcher=...`), the machinery
`--multirun` uses: a generated primary config `retrain.yaml` in the recipe folder plus one override
`retrain.exclusion=<key>` per job. The default (basic) launcher runs them in-process one after another;
`hydra/launcher=local` (submitit_local) runs them as parallel processes on this machine,
`hydra/launcher=slurm` as a SLURM array.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion_attribution.data.base import parse_id_list
from diffusion_attribution.evaluation.report import markdown_table, write_json, write_text
from diffusion_attribution.models.pipeline import CONFIG_FILE
from diffusion_attribution.training.fit import train_model
from diffusion_attribution.utils.atomic import atomic_write_text
from diffusion_attribution.utils.fingerprint import hash_json
from diffusion_attribution.utils.seeding import Stream, keyed_generator

log = logging.getLogger(__name__)

RETRAIN_CONFIG = "retrain"  # the generated primary config: <recipe folder>/retrain.yaml
DONE_FILE = "retrain.json"  # written once the checkpoint is complete
# Top-level config nodes that decide a trained model, and the keys inside them that do not.
RECIPE_NODES = ("seed", "data", "model", "training", "trainer")
NOT_RECIPE = {
    "data": {"exclude", "num_workers", "cache_dir", "cache_images", "sample_prompts"},
    "training": {"resume", "checkpoint_every_n_steps", "keep_checkpoints", "log_every_n_steps"},
    "trainer": {"enable_progress_bar", "log_every_n_steps"},
}


class RetrainError(ValueError):
    """A retrain that cannot be planned or did not finish; the message says what to do."""


def load_base_training_config(checkpoint: str | Path) -> DictConfig:
    """The resolved config the base model was trained with (written by train.py beside the weights)."""
    path = Path(checkpoint) / CONFIG_FILE
    if not path.is_file():
        raise RetrainError(
            f"{path} not found: leave-K-out retrains a model with its own recipe, which train.py records in "
            "<checkpoint>/training_config.yaml. Evaluate attributions of a model trained with train.py."
        )
    return OmegaConf.load(path)


def retrain_config(base: DictConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """The base recipe + `overrides` (a dotlist, e.g. trainer.accelerator=gpu) with keyed draws and no
    resume: what every retrain of this plan runs (data.exclude is set per job)."""
    cfg = copy.deepcopy(base)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    with open_dict(cfg):
        cfg.training.example_keyed_rng = True
        cfg.training.resume = None
    return cfg


def recipe_hash(cfg: DictConfig) -> str:
    """Hash of what decides the retrained weights (see NOT_RECIPE for what is left out)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    recipe: dict[str, Any] = {}
    for node in RECIPE_NODES:
        value = plain.get(node)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in NOT_RECIPE.get(node, ())}
        recipe[node] = value
    return hash_json(recipe, length=12)


def exclusion_key(ids: np.ndarray) -> str:
    """`k<size>-<hash>` of a sorted, de-duplicated id set (readable in directory listings)."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    digest = hashlib.sha1(ids.astype("<i8").tobytes()).hexdigest()[:12]
    return f"k{len(ids)}-{digest}"


def random_exclusion(num_examples: int, size: int, seed: int, *keys: int) -> np.ndarray:
    """`size` distinct ids drawn uniformly from a generator keyed by (seed, keys): query-independent,
    so one random set serves every query (the leave-K-out baseline) or every method (LDS)."""
    if not 0 < size <= num_examples:
        raise RetrainError(f"Cannot draw {size} of {num_examples} training examples at random.")
    generator = keyed_generator(seed, Stream.RANDOM_SUBSET, *keys)
    return np.sort(torch.randperm(num_examples, generator=generator)[:size].numpy())


def checkpoint_step(path: Path) -> int | None:
    """The global step of a Lightning checkpoint (memory-mapped: large ones are not read)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a checkpoint cut short by a kill: the retrain starts over
        return None
    return int(state.get("global_step", 0))


@dataclass
class RetrainJob:
    """One exclusion set of one recipe, and who asked for it."""

    key: str
    ids: np.ndarray
    run_dir: Path
    requests: list[dict[str, Any]] = field(default_factory=list)

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoint"

    @property
    def done(self) -> bool:
        return (self.run_dir / DONE_FILE).is_file() and self.checkpoint.is_dir()

    def status(self) -> tuple[str, int]:
        """('done' | 'partial' | 'new', steps already trained)."""
        if self.done:
            return "done", -1
        last = self.run_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            step = checkpoint_step(last)
            if step is not None:
                return "partial", step
        return "new", 0


@dataclass
class RetrainSettings:
    """How a retraining benchmark (leave-K-out, LDS) retrains and measures: the `benchmark.retrain`
    node (conf/benchmark/retrain/default.yaml), shared by both."""

    dir: str = ".cache/retrains"  # <dir>/<recipe hash>/<exclusion key>/: reused across runs and benchmarks
    overrides: Sequence[str] = ()  # dotlist over the base's recipe (changes the recipe hash)
    num_threads: int | None = None  # torch threads inside each retrain job (None: torch's default)
    launch_batch_size: int | None = None  # jobs handed to the launcher at once (None: all)
    dry_run: bool = False  # list the retrains and their estimated compute, train nothing
    seconds_per_step: float | None = None  # compute estimate until a retrain of the recipe is timed
    timestep_stride: int = 5  # the fixed-noise loss grid: timesteps 0, stride, 2·stride, ...
    loss_batch_size: int = 256  # timesteps per forward pass of that loss

    @classmethod
    def coerce(cls, value: RetrainSettings | Mapping[str, Any] | None) -> RetrainSettings:
        """The settings from an instance, a mapping (a config node without _target_) or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)  # type: ignore[assignment]
        fields = {k: v for k, v in dict(value).items() if not str(k).startswith("_")}
        return cls(**fields)

    def plan(self, base_checkpoint: str | Path, num_examples: int) -> RetrainPlan:
        return RetrainPlan(base_checkpoint, num_examples, self.dir, list(self.overrides), self.num_threads)

    def announce(self, plan: RetrainPlan, run_dir: Path) -> dict[str, Any]:
        """Write the plan (plan.md, plan.json) and print it; returns its summary."""
        listing = plan.describe(self.seconds_per_step)
        summary = plan.summary(self.seconds_per_step)
        write_text(run_dir / "plan.md", listing)
        write_json(run_dir / "plan.json", {"summary": summary, "jobs": plan.rows(self.seconds_per_step)})
        print(listing)
        return summary

    def launch(self, plan: RetrainPlan) -> None:
        """Train what is missing through the running evaluate.py job's launcher."""
        plan.launch(current_launcher(), self.launch_batch_size)


def current_launcher() -> DictConfig | None:
    """The `hydra.launcher` node of the running evaluate.py job (None outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().launcher


class RetrainPlan:
    """Every retrain a benchmark needs for one base model, de-duplicated by exclusion key."""

    def __init__(
        self,
        base_checkpoint: str | Path,
        num_examples: int,
        retrain_dir: str | Path = ".cache/retrains",
        overrides: Sequence[str] = (),
        num_threads: int | None = None,
    ) -> None:
        self.base_checkpoint = Path(base_checkpoint).resolve()
        self.base_config = load_base_training_config(self.base_checkpoint)
        self.config = retrain_config(self.base_config, overrides)
        self.recipe = recipe_hash(self.config)
        self.root = (Path(retrain_dir) / self.recipe).resolve()
        self.num_examples = int(num_examples)
        self.num_threads = num_threads
        # Ids the base model itself was trained without stay excluded in every retrain.
        self.base_excluded = parse_id_list(self.base_config.data.get("exclude"), self.num_examples)
        self.jobs: dict[str, RetrainJob] = {}
        if not self.base_config.training.get("example_keyed_rng", False):
            log.warning(
                "The base model was trained without training.example_keyed_rng: its retrains cannot share its "
                "random numbers, so each ΔL also carries seed-to-seed noise (the random-removal baseline "
                "measures it). Train the base with training.example_keyed_rng=true (experiment="
                "leave_k_out_cpu does) for lower-variance comparisons."
            )

    @property
    def max_steps(self) -> int:
        return int(self.config.training.max_steps)

    def request(self, ids: np.ndarray, **who: Any) -> RetrainJob:
        """The retrain without `ids` (plus the base's own exclusions); `who` records the asker."""
        ids = np.union1d(np.asarray(ids, dtype=np.int64), self.base_excluded)
        bad = ids[(ids < 0) | (ids >= self.num_examples)]
        if len(bad):
            raise RetrainError(f"Exclusion ids {bad[:5].tolist()} are outside 0..{self.num_examples - 1}.")
        key = exclusion_key(ids)
        job = self.jobs.get(key)
        if job is None:
            job = self.jobs[key] = RetrainJob(key, ids, self.root / key)
        job.requests.append(who)
        return job

    # ------------------------------------------------------------------------------------ compute
    def measured_seconds_per_step(self) -> float | None:
        """Mean wall seconds per training step of this recipe's finished retrains (None if none)."""
        rates = []
        for done in self.root.glob(f"*/{DONE_FILE}"):
            try:
                info = json.loads(done.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if info.get("steps_trained", 0) > 0 and info.get("seconds", 0) > 0:
                rates.append(info["seconds"] / info["steps_trained"])
        return float(np.mean(rates)) if rates else None

    def rows(self, seconds_per_step: float | None = None) -> list[dict[str, Any]]:
        """One row per job: key, size, status, steps left, estimated seconds, who asked."""
        rate = self.measured_seconds_per_step() or seconds_per_step
        rows = []
        for job in self.jobs.values():
            status, step = job.status()
            left = 0 if status == "done" else self.max_steps - step
            rows.append(
                {
                    "key": job.key,
                    "num_excluded": len(job.ids),
                    "status": status if status != "partial" else f"partial (step {step})",
                    "steps_left": left,
                    "estimated_s": None if rate is None else left * rate,
                    "requested_by": "; ".join(
                        ", ".join(f"{k}={v}" for k, v in who.items()) for who in job.requests
                    ),
                    "run_dir": str(job.run_dir),
                }
            )
        return rows

    def summary(self, seconds_per_step: float | None = None) -> dict[str, Any]:
        rows = self.rows(seconds_per_step)
        measured = self.measured_seconds_per_step()
        rate = measured or seconds_per_step
        left = sum(r["steps_left"] for r in rows)
        return {
            "base_checkpoint": str(self.base_checkpoint),
            "recipe": self.recipe,
            "retrain_root": str(self.root),
            "requests": sum(len(j.requests) for j in self.jobs.values()),
            "jobs": len(rows),
            "done": sum(r["status"] == "done" for r in rows),
            "to_train": sum(r["status"] != "done" for r in rows),
            "steps_per_retrain": self.max_steps,
            "steps_left": left,
            "seconds_per_step": rate,
            "seconds_per_step_source": "measured" if measured else ("configured" if rate else None),
            "estimated_hours": None if rate is None else left * rate / 3600,
        }

    def describe(self, seconds_per_step: float | None = None) -> str:
        """A markdown listing of the jobs and the estimated compute (what a dry run prints)."""
        s = self.summary(seconds_per_step)
        if s["seconds_per_step"] is None:
            cost = "unknown: no retrain of this recipe has been timed yet; set benchmark.retrain.seconds_per_step"
        else:
            cost = (
                f"{s['estimated_hours']:.2f} h at {s['seconds_per_step']:.3g} s/step ({s['seconds_per_step_source']}),"
                " run one after another"
            )
        lines = [
            f"Base model: {s['base_checkpoint']} (recipe {s['recipe']}, {s['steps_per_retrain']} steps per retrain)",
            f"Retrains: {s['jobs']} distinct exclusion sets for {s['requests']} requests; {s['done']} done, "
            f"{s['to_train']} to train ({s['steps_left']} steps). Estimated compute: {cost}.",
            f"Retrain folder: {s['retrain_root']}",
            "",
        ]
        rows = [
            [
                r["key"],
                r["num_excluded"],
                r["status"],
                r["steps_left"],
                "?" if r["estimated_s"] is None else f"{r['estimated_s'] / 60:.1f}",
                r["requested_by"],
            ]
            for r in self.rows(seconds_per_step)
        ]
        lines.append(
            markdown_table(["key", "excluded", "status", "steps left", "est. min", "requested by"], rows)
        )
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------------------------ files
    def write_files(self) -> None:
        """Exclusion id files and the primary config `retrain.yaml` of this recipe's jobs."""
        exclusions = self.root / "exclusions"
        for job in self.jobs.values():
            path = exclusions / f"{job.key}.txt"
            if not path.is_file():
                atomic_write_text(path, "".join(f"{i}\n" for i in job.ids.tolist()))
        cfg = copy.deepcopy(self.config)
        with open_dict(cfg):
            cfg.data.exclude = "${retrain.exclusion_dir}/${retrain.exclusion}.txt"
            if cfg.get("logger") is not None and "save_dir" in cfg.logger:
                cfg.logger.save_dir = "${hydra:runtime.output_dir}"
            cfg.retrain = {
                "exclusion": "???",
                "exclusion_dir": str(exclusions),
                "base_checkpoint": str(self.base_checkpoint),
                "recipe": self.recipe,
                "num_threads": self.num_threads,
            }
        text = OmegaConf.to_yaml(cfg)
        hydra_node = {
            "hydra": {
                "job": {"name": "retrain", "chdir": False},
                "run": {"dir": f"{self.root}/${{retrain.exclusion}}"},
                "sweep": {"dir": str(self.root), "subdir": "${retrain.exclusion}"},
            }
        }
        header = (
            f"# Retrains of {self.base_checkpoint} (recipe {self.recipe}), written by evaluation/retraining.py.\n"
            "# One job per exclusion set: retrain.exclusion=<key> (ids in exclusions/<key>.txt).\n"
            "defaults:\n  - _self_\n"
        )
        atomic_write_text(self.root / f"{RETRAIN_CONFIG}.yaml", header + text + OmegaConf.to_yaml(hydra_node))

    # ------------------------------------------------------------------------------------ launch
    def launch(
        self,
        launcher: DictConfig | None = None,
        batch_size: int | None = None,
        jobs: Sequence[RetrainJob] | None = None,
    ) -> None:
        """Train every job that is not done, through the Hydra launcher `launcher` (a `hydra.launcher`
        node, e.g. the evaluate run's; None = in-process, one after another), `batch_size` jobs at a time."""
        pending = [j for j in (jobs if jobs is not None else self.jobs.values()) if not j.done]
        self.write_files()
        if not pending:
            log.info("All %d retrains are done (reused from %s).", len(self.jobs), self.root)
            return
        log.info(
            "Launching %d retrains (%d reused) under %s",
            len(pending),
            len(self.jobs) - len(pending),
            self.root,
        )
        launch_jobs(self.root, [[f"retrain.exclusion={j.key}"] for j in pending], launcher, batch_size)
        unfinished = [j.key for j in pending if not j.done]
        if unfinished:
            raise RetrainError(
                f"{len(unfinished)} retrains did not finish ({unfinished[:5]}...); their logs are under "
                f"{self.root}/<key>/. Rerun the same command: finished retrains are reused, interrupted ones resume."
            )


@contextmanager
def preserved_hydra_state() -> Iterator[None]:
    """Launchers set the global HydraConfig and reconfigure logging for each job: put the calling run's
    back afterwards (its later log lines still go to its own log file)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.instance().cfg
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    cwd = os.getcwd()
    try:
        yield
    finally:
        HydraConfig.instance().cfg = hydra_cfg
        root.handlers[:] = handlers
        root.setLevel(level)
        os.chdir(cwd)


def make_launcher(config_dir: Path, launcher: DictConfig | None = None) -> tuple[Any, DictConfig]:
    """The Hydra launcher for the jobs of `<config_dir>/retrain.yaml`: that config composed as a
    multirun master config, given the `launcher` node (None: Hydra's basic, in-process launcher)."""
    from hydra._internal.callbacks import Callbacks
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext, RunMode

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(config_dir)))
    master = loader.load_configuration(config_name=RETRAIN_CONFIG, overrides=[], run_mode=RunMode.MULTIRUN)
    if launcher is not None:
        with open_dict(master):
            master.hydra.launcher = OmegaConf.create(OmegaConf.to_container(launcher, resolve=False))
    context = HydraContext(config_loader=loader, callbacks=Callbacks(master))
    with preserved_hydra_state():
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(master)
        hydra_launcher = Plugins.instance().instantiate_launcher(
            hydra_context=context, task_function=retrain_job, config=master
        )
    return hydra_launcher, master


def launch_jobs(
    config_dir: Path,
    job_overrides: list[list[str]],
    launcher: DictConfig | None = None,
    batch_size: int | None = None,
) -> None:
    """Hand the job overrides to the Hydra launcher of `make_launcher` (as `--multirun` would, without
    a sweeper), `batch_size` jobs at a time; raise naming the jobs that failed."""
    from hydra.core.utils import JobStatus

    hydra_launcher, master = make_launcher(config_dir, launcher)
    step = batch_size or len(job_overrides)
    failures: list[str] = []
    with preserved_hydra_state():
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(master)
        for start in range(0, len(job_overrides), step):
            chunk = job_overrides[start : start + step]
            returns = hydra_launcher.launch(chunk, initial_job_idx=start)
            for overrides, ret in zip(chunk, returns, strict=True):
                if ret.status != JobStatus.COMPLETED:
                    failures.append(f"{' '.join(overrides)}: {ret._return_value!r}")
    if failures:
        raise RetrainError("Retrain jobs failed:\n  " + "\n  ".join(failures))


def retrain_job(cfg: DictConfig) -> str:
    """The task function of one retrain (runs inside a Hydra job: in-process, submitit or SLURM):
    reuse a finished retrain, resume an interrupted one, else train; then write retrain.json."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    done = run_dir / DONE_FILE
    if done.is_file() and (run_dir / "checkpoint").is_dir():
        log.info("Retrain %s is done: reusing %s", cfg.retrain.exclusion, run_dir / "checkpoint")
        return str(run_dir / "checkpoint")
    if cfg.retrain.get("num_threads"):
        torch.set_num_threads(int(cfg.retrain.num_threads))
    cfg = copy.deepcopy(cfg)
    last = run_dir / "checkpoints" / "last.ckpt"
    start_step = checkpoint_step(last) if last.is_file() else None
    with open_dict(cfg):
        cfg.training.resume = str(last) if start_step is not None else None
    if start_step is not None:
        log.info("Resuming retrain %s from step %d", cfg.retrain.exclusion, start_step)
    started = time.perf_counter()
    checkpoint = train_model(cfg, run_dir)
    seconds = time.perf_counter() - started
    steps = int(cfg.training.max_steps) - (start_step or 0)
    ids = parse_id_list(cfg.data.exclude, 1 << 62)
    info = {
        "exclusion": cfg.retrain.exclusion,
        "num_excluded": len(ids),
        "base_checkpoint": cfg.retrain.base_checkpoint,
        "recipe": cfg.retrain.recipe,
        "max_steps": int(cfg.training.max_steps),
        "resumed_from_step": start_step,
        "steps_trained": steps,
        "seconds": seconds,
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_text(done, json.dumps(info, indent=2))
    log.info("Retrain %s done in %.1f min: %s", cfg.retrain.exclusion, seconds / 60, checkpoint)
    return str(checkpoint)
