"""Leave-K-out retraining and evaluation (evaluation/retraining.py, evaluation/leave_k_out/ and the
keyed training they rely on): the plan lists each retrain once, a retrain trains the same number of
steps on exactly the remaining ids, finished retrains are reused and killed ones resume to the same
weights, ΔL of a model against itself is exactly 0, the benchmark runs end to end through evaluate's
job, and the submitit launchers compose with it."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from compose_jobs import compose_job
from conftest import CONF_DIR, FAST_TRAIN
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from safetensors.torch import load_file

from diffusion_attribution.attribution.queries import build_queries
from diffusion_attribution.evaluation import retraining
from diffusion_attribution.evaluation.leave_k_out.metrics import (
    ImageJudges,
    Reference,
    fixed_noise_loss,
    model_metrics,
)
from diffusion_attribution.evaluation.leave_k_out.plan import plan_leave_k_out
from diffusion_attribution.evaluation.leave_k_out.runs import load_attribution_runs
from diffusion_attribution.evaluation.retraining import RetrainError, RetrainPlan, exclusion_key, recipe_hash
from diffusion_attribution.jobs.evaluate import run_benchmark
from diffusion_attribution.jobs.train import run_training
from diffusion_attribution.models.pipeline import CONFIG_FILE, TextToImageModel
from diffusion_attribution.training.callbacks import ProgressLogCallback
from diffusion_attribution.training.keyed import ExampleKeyedTrainingModule, epoch_order

NUM_EXAMPLES = 96  # FAST_TRAIN's world: 64 plain + 8 concepts x 4
STEPS = 6
PROMPTS = ["a striped red square on a gray background", "a hollow blue circle on a white background"]


@pytest.fixture(autouse=True)
def clear_hydra():
    yield
    HydraConfig.instance().cfg = None


@pytest.fixture(scope="session")
def recipe(shapes_cache: Path) -> list[str]:
    """A 6-step keyed recipe at 16 px on the test world (checkpoints every 2 steps)."""
    return [
        *FAST_TRAIN,
        f"data.cache_dir={shapes_cache}",
        "model.resolution=16",
        f"training.max_steps={STEPS}",
        "training.checkpoint_every_n_steps=2",
        "samples.every_n_steps=0",
        "+training.example_keyed_rng=true",
    ]


@pytest.fixture(scope="session")
def base_checkpoint(recipe: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("base")
    try:
        return run_training(compose_job("train", recipe, run_dir), run_dir)
    finally:
        HydraConfig.instance().cfg = None


def fake_base(tmp_path: Path, overrides: list[str]) -> Path:
    """A checkpoint folder holding only training_config.yaml: all that planning reads."""
    folder = tmp_path / "fake_base" / "checkpoint"
    folder.mkdir(parents=True)
    cfg = compose_job("train", overrides, tmp_path / "fake_base")
    (folder / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    HydraConfig.instance().cfg = None
    return folder


def write_run(
    folder: Path,
    method: str,
    scores: np.ndarray,
    model_path: Path,
    queries: list[dict[str, Any]] | None = None,
) -> Path:
    """A minimal attribute.py run directory (scores.npy + ranking.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "scores.npy", scores.astype(np.float32))
    records = queries or [{"caption": f"q{k}", "prompt": f"q{k}", "seed": k} for k in range(len(scores))]
    ranking = {"method": method, "model": str(model_path), "queries": records}
    (folder / "ranking.json").write_text(json.dumps(ranking))
    return folder


# ------------------------------------------------------------------------------------------ planning
def test_plan_lists_each_exclusion_set_once(recipe: list[str], tmp_path: Path) -> None:
    base = fake_base(tmp_path, recipe)
    rng = np.random.default_rng(0)
    a, b = rng.random((3, NUM_EXAMPLES)), rng.random((3, NUM_EXAMPLES))
    a[1] = a[0]  # method a ranks queries 0 and 1 alike: their top-K sets are the same retrains
    b[2, np.argsort(-a[2])[:3]] += 10  # method b's top-3 for query 2 equals method a's
    runs = load_attribution_runs(
        [write_run(tmp_path / "a", "a", a, base), write_run(tmp_path / "b", "b", b, base)]
    )
    plan = RetrainPlan(base, NUM_EXAMPLES, tmp_path / "retrains")
    entries = plan_leave_k_out(runs, plan, ks=[2, 3], random_draws=2, seed=0)

    expected: set[str] = set()
    for scores in (a, b):
        for q in range(3):
            for k in (2, 3):
                expected.add(exclusion_key(np.argsort(-scores[q], kind="stable")[:k]))
    randoms = {e["job"].key for e in entries if e["method"] == "random"}
    assert len(randoms) == 4  # 2 draws x 2 K, shared by the queries (query=None)
    assert all(e["query"] is None for e in entries if e["method"] == "random")
    assert set(plan.jobs) == expected | randoms
    assert len(expected) == 2 * 3 * 2 - 2 - 1  # q0/q1 of a share both K; a and b share (q2, K=3)
    assert sum(len(j.requests) for j in plan.jobs.values()) == 2 * 3 * 2 + 4
    shared = plan.jobs[exclusion_key(np.argsort(-a[2], kind="stable")[:3])]
    assert {r["method"] for r in shared.requests} == {"a", "b"}
    # Every job lives under the recipe hash; excluded ids are what the method ranked top.
    assert all(j.run_dir.parent == plan.root for j in plan.jobs.values())
    assert plan.root.name == recipe_hash(plan.config)
    listing = plan.describe(seconds_per_step=0.5)
    assert f"{len(plan.jobs)} distinct exclusion sets for {2 * 3 * 2 + 4} requests" in listing
    assert f"{len(plan.jobs) * STEPS} steps" in listing and "configured" in listing


def test_recipe_hash_ignores_logging_but_not_the_recipe(recipe: list[str], tmp_path: Path) -> None:
    base = retraining.load_base_training_config(fake_base(tmp_path, recipe))
    key = recipe_hash(retraining.retrain_config(base))
    assert recipe_hash(retraining.retrain_config(base, ["trainer.enable_progress_bar=true"])) == key
    assert recipe_hash(retraining.retrain_config(base, ["data.cache_dir=/elsewhere"])) == key
    assert recipe_hash(retraining.retrain_config(base, ["training.optim.lr=0.5"])) != key
    assert recipe_hash(retraining.retrain_config(base, ["seed=1"])) != key


def test_dry_run_through_evaluate_at_paper_scale(tmp_path: Path) -> None:
    """experiment=mscoco benchmark=leave_k_out: K = 500/1000/4000 of 118,287, listed with its cost."""
    coco = tmp_path / "coco"
    base = fake_base(
        tmp_path,
        [
            "experiment=mscoco",
            f"data.root={coco}",
            f"model.vae_path={coco}",
            f"model.text_encoder_path={coco}",
        ],
    )
    num_train = 118_287
    scores = np.random.default_rng(0).random((2, num_train), dtype=np.float32)
    run = write_run(tmp_path / "unlearning", "unlearning", scores, base)
    out = tmp_path / "eval"
    cfg = compose_job(
        "evaluate",
        ["experiment=mscoco", "benchmark=leave_k_out", f"scores=[{run}]", "benchmark.retrain.dry_run=true",
         f"benchmark.retrain.dir={tmp_path / 'retrains'}", f"data.root={coco}"],
        out,
    )  # fmt: skip
    summary = run_benchmark(cfg, out)
    assert cfg.benchmark.k == [500, 1000, 4000]
    random_draws = cfg.benchmark.random_draws
    assert summary["jobs"] == 2 * 3 + 3 * random_draws
    assert summary["steps_per_retrain"] == 184_824
    hours = summary["jobs"] * 184_824 * cfg.benchmark.retrain.seconds_per_step / 3600
    assert summary["estimated_hours"] == pytest.approx(hours)
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["jobs"]) == summary["jobs"] and not (tmp_path / "retrains").exists()  # nothing trained


# ------------------------------------------------------------------------------------------ retraining
def test_retrain_trains_the_same_steps_on_exactly_the_remaining_ids(
    recipe: list[str], base_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[tuple[int, int]]] = []
    original = ExampleKeyedTrainingModule.training_step

    def recording_step(self, batch, batch_idx):
        seen.append(list(zip(batch["epoch"].tolist(), batch["id"].tolist(), strict=True)))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ExampleKeyedTrainingModule, "training_step", recording_step)
    excluded = np.array([0, 5, 17, 40, 41, 42, 90])
    plan = RetrainPlan(
        base_checkpoint,
        NUM_EXAMPLES,
        tmp_path / "retrains",
        ["training.max_steps=14", "trainer.max_steps=14"],
    )
    job = plan.request(excluded, who="test")
    plan.launch()
    kept = np.setdiff1d(np.arange(NUM_EXAMPLES), excluded)
    batch = 8
    per_epoch = len(kept) // batch  # 11 batches of 8: 88 of the 89 kept ids per epoch (drop_last)
    assert len(seen) == 14 and all(len(b) == batch for b in seen)
    for epoch in (0, 1):
        ids = [i for b in seen for e, i in b if e == epoch]
        assert len(ids) == (per_epoch * batch if epoch == 0 else (14 - per_epoch) * batch)
        assert len(set(ids)) == len(ids) and set(ids) <= set(kept.tolist())
        order = epoch_order(0, epoch, NUM_EXAMPLES, kept)
        assert ids == order[: len(ids)].tolist()  # the keyed order of the remaining ids
    assert {e for b in seen[:per_epoch] for e, _ in b} == {0}
    assert json.loads((job.run_dir / "retrain.json").read_text())["steps_trained"] == 14
    state = torch.load(job.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 14
    assert OmegaConf.load(job.checkpoint / CONFIG_FILE).data.exclude.endswith(f"{job.key}.txt")


def unet_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(next((checkpoint / "unet").glob("*.safetensors")))


def test_killed_retrain_resumes_to_the_same_weights_and_finished_ones_are_reused(
    base_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    excluded = np.array([3, 4, 60])
    reference = RetrainPlan(base_checkpoint, NUM_EXAMPLES, tmp_path / "uninterrupted")
    reference.request(excluded)
    reference.launch()

    plan = RetrainPlan(base_checkpoint, NUM_EXAMPLES, tmp_path / "killed")
    job = plan.request(excluded)
    original = ProgressLogCallback.on_train_batch_end

    def killed_at_step_5(self, trainer, *args):
        if trainer.global_step == 5:
            raise RuntimeError("killed")
        return original(self, trainer, *args)

    monkeypatch.setattr(ProgressLogCallback, "on_train_batch_end", killed_at_step_5)
    with pytest.raises(RetrainError, match="killed"):
        plan.launch()
    assert job.status() == ("partial", 4)  # the last checkpoint before the kill
    monkeypatch.setattr(ProgressLogCallback, "on_train_batch_end", original)
    plan.launch()
    info = json.loads((job.run_dir / "retrain.json").read_text())
    assert (info["resumed_from_step"], info["steps_trained"]) == (4, STEPS - 4)
    resumed, uninterrupted = unet_weights(job.checkpoint), unet_weights(reference.jobs[job.key].checkpoint)
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in uninterrupted)

    # A finished retrain is reused: asking again (from a new plan) trains nothing.
    monkeypatch.setattr(retraining, "checkpoint_step", lambda path: pytest.fail("should not resume"))
    import diffusion_attribution.jobs.train as train_job

    monkeypatch.setattr(train_job, "run_training", lambda *a: pytest.fail("should not train"))
    again = RetrainPlan(base_checkpoint, NUM_EXAMPLES, tmp_path / "killed")
    again.request(np.array([60, 3, 4]))  # the same set, another order
    assert again.summary()["to_train"] == 0
    again.launch()


# ------------------------------------------------------------------------------------------ metrics
def test_delta_loss_of_a_model_against_itself_is_zero(base_checkpoint: Path) -> None:
    model = TextToImageModel.from_pretrained(base_checkpoint).eval()
    query = build_queries(OmegaConf.create({"prompts": PROMPTS[:1], "seeds": [3]}), model, num_steps=4)[0]
    grid = list(range(0, 1000, 50))
    base_loss = fixed_noise_loss(model, query.latent, query.caption, 7, grid, batch_size=8)
    reference = Reference(base_loss, query.image)
    sampler = {"num_steps": 4, "guidance_scale": 3.0, "sampler": "ddim"}
    judges = ImageJudges(None, _Nothing(), "")
    same, image = model_metrics(
        model, query.latent, query.caption, 7, PROMPTS[0], 3, sampler, reference, judges, grid, 0, 8
    )
    assert same["delta_loss"] == 0.0 and same["dg_mse"] == 0.0
    assert torch.equal(image, query.image)
    # The fixed noise is keyed: another key or another batch size changes nothing but the key does.
    assert fixed_noise_loss(model, query.latent, query.caption, 7, grid, batch_size=3) == pytest.approx(
        base_loss, rel=1e-5
    )
    assert fixed_noise_loss(model, query.latent, query.caption, 8, grid, batch_size=8) != base_loss
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    changed, _ = model_metrics(
        model, query.latent, query.caption, 7, PROMPTS[0], 3, sampler, reference, judges, grid, 0, 8
    )
    assert changed["delta_loss"] > 0 and changed["dg_mse"] > 0


class _Nothing:
    """A datamodule stand-in that is not the embedded world (no attribute reader)."""


# ------------------------------------------------------------------------------------------ end to end
def attribution_runs(base_checkpoint: Path, tmp_path: Path) -> list[Path]:
    """Two 'methods' with their own scores over the same generated queries, as attribute.py writes."""
    model = TextToImageModel.from_pretrained(base_checkpoint).eval()
    sampler = {"num_steps": 4, "guidance_scale": 3.0, "sampler": "ddim"}
    rng = np.random.default_rng(1)
    runs = []
    for method in ("good", "noisy"):
        folder = tmp_path / method
        queries = build_queries(
            OmegaConf.create({"prompts": PROMPTS, "seeds": [0, 1]}), model, folder, **sampler
        )
        runs.append(
            write_run(
                folder, method, rng.random((2, NUM_EXAMPLES)), base_checkpoint, [q.record() for q in queries]
            )
        )
    return runs


class StripedEverywhere:
    """The attribute reader's stand-in (training the real one takes minutes): reads 'striped'."""

    def read(self, images: torch.Tensor) -> list[dict[str, str]]:
        return [{"concept": "striped"} for _ in images]


def test_leave_k_out_end_to_end_through_evaluate(
    base_checkpoint: Path, recipe: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusion_attribution.evaluation import attribute_reader

    monkeypatch.setattr(
        attribute_reader, "load_or_train_reader", lambda world, cache: (StripedEverywhere(), {})
    )
    runs = attribution_runs(base_checkpoint, tmp_path)
    out = tmp_path / "eval"
    overrides = [
        *[o for o in recipe if o.startswith("data.") or o.startswith("model.")],
        "benchmark=leave_k_out",
        f"scores=[{runs[0]},{runs[1]}]",
        "benchmark.k=[3]",
        "benchmark.random_draws=2",
        f"benchmark.retrain.dir={tmp_path / 'retrains'}",
        "benchmark.retrain.timestep_stride=100",
        "benchmark.retention_prompts=['a red circle on a black background']",
        "benchmark.example_queries=2",
    ]
    result = run_benchmark(compose_job("evaluate", overrides, out), out)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 + 2 * 2  # 2 methods x 2 queries + 2 random draws x 2 queries
    assert {(r["method"], r["query"]) for r in rows if r["method"] != "random"} == {
        (m, q) for m in ("good", "noisy") for q in ("0", "1")
    }
    for r in rows:
        assert float(r["loss_retrained"]) - float(r["loss_base"]) == pytest.approx(float(r["delta_loss"]))
        assert float(r["dg_mse"]) >= 0 and r["concept"] in ("striped", "hollow")
        assert r["retention_delta_loss"] != ""
        assert r["concept_kept"] == ("1.0" if r["concept"] == "striped" else "0.0")
    table = (out / "leave_k_out.md").read_text()
    assert "ΔL ×1e-3" in table and "| random |" in table and "ΔG CLIP ×1e-1 (↓)**: not measured" in table
    assert (out / "delta_loss_vs_k.png").stat().st_size > 0 and (out / "before_after.png").stat().st_size > 0
    assert set(result["summary"]) == {"good", "noisy", "random"}
    # Rerun: every retrain is reused (nothing new under the retrain folder).
    before = sorted(p.name for p in (tmp_path / "retrains").glob("*/*/retrain.json"))
    out2 = tmp_path / "eval2"
    run_benchmark(compose_job("evaluate", overrides, out2), out2)
    assert sorted(p.name for p in (tmp_path / "retrains").glob("*/*/retrain.json")) == before
    assert (out2 / "results.csv").read_text() == (out / "results.csv").read_text()


# ------------------------------------------------------------------------------------------ launchers
@pytest.mark.parametrize(
    "launcher,target",
    [
        ("local", "LocalLauncher"),
        ("slurm", "SlurmLauncher"),
        ("submitit_local", "LocalLauncher"),
        ("submitit_slurm", "SlurmLauncher"),
    ],
)
def test_submitit_launchers_compose_with_the_benchmark(
    launcher: str, target: str, recipe: list[str], tmp_path: Path
) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "evaluate",
            [f"hydra/launcher={launcher}", "benchmark=leave_k_out", "benchmark.k=[2]"],
            return_hydra_config=True,
        )
    assert cfg.benchmark._target_.endswith("run_leave_k_out_benchmark")
    plan = RetrainPlan(fake_base(tmp_path, recipe), NUM_EXAMPLES, tmp_path / "retrains")
    plan.request(np.array([1, 2]))
    plan.write_files()
    hydra_launcher, master = retraining.make_launcher(plan.root, cfg.hydra.launcher)
    assert type(hydra_launcher).__name__ == target
    assert hydra_launcher.params["submitit_folder"] == f"{plan.root}/.submitit/%j"
    # Each job's config is the base recipe with its exclusion file and keyed draws.
    job = hydra_launcher.hydra_context.config_loader.load_sweep_config(master, ["retrain.exclusion=k2-x"])
    assert job.data.exclude == f"{plan.root}/exclusions/k2-x.txt"
    assert job.training.example_keyed_rng is True and job.hydra.sweep.subdir == "k2-x"
