"""`evaluate.py benchmark=fidelity_curve run=<train.py run dir>`: fidelity versus training time. Exports
the EMA weights of every periodic checkpoint of a training run (train.py ... training.keep_checkpoints=
true) and runs the fidelity benchmark (evaluation/fidelity.py) on each, with the run's own data.

Writes fidelity_curve.csv/.md (step, training minutes, attribute accuracy, all-attributes accuracy,
rare-concept hit rate, concepts recognised), fidelity_curve.png, and each checkpoint's fidelity outputs
under step_<step>/. Training minutes come from the run's own progress log lines (train.log), so they
are the run's wall clock on its machine. The headline is the last checkpoint's rare-concept hit rate.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_attribution.evaluation import report
from diffusion_attribution.evaluation.fidelity import run_fidelity_benchmark
from diffusion_attribution.training.fit import export_lightning_checkpoint

log = logging.getLogger(__name__)

CURVE_METRICS = ("attribute_accuracy", "all_attributes_accuracy", "rare_concept_hit_rate")


def minutes_at_steps(train_log: Path) -> dict[int, float]:
    """step -> training minutes elapsed, from the progress lines of a run's train.log."""
    if not train_log.is_file():
        return {}
    found = {}
    for line in train_log.read_text().splitlines():
        m = re.search(r"step (\d+)/\d+ .* ([\d.]+) min elapsed", line)
        if m:
            found[int(m.group(1))] = float(m.group(2))
    return found


def periodic_checkpoints(train_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(p.stem.split("_")[1]), p) for p in (train_dir / "checkpoints").glob("step_*.ckpt")]
    if not found:
        raise FileNotFoundError(
            f"No step_*.ckpt in {train_dir / 'checkpoints'}: train with training.keep_checkpoints=true."
        )
    return sorted(found)


def run_fidelity_curve_benchmark(
    cfg: DictConfig,
    run_dir: str | Path,
    run: str | None = None,
    seeds_per_prompt: int = 2,
    prompts_per_concept: int = 4,
    num_steps: int = 30,
    guidance_scale: float = 3.0,
    sampler: str = "ddim",
    batch_size: int = 64,
    reader_cache_dir: str | None = None,
    num_threads: int | None = None,
) -> dict[str, Any]:
    if not run:
        raise ValueError(
            "benchmark=fidelity_curve needs run=<train.py run directory> (or benchmark.run=...)."
        )
    run_dir, train_dir = Path(run_dir), Path(run)
    config_file = train_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: run= must be a train.py run directory.")
    if num_threads:
        torch.set_num_threads(int(num_threads))
    train_cfg = OmegaConf.load(config_file)
    train_cfg.pop("logger", None)  # its ${hydra:...} paths only resolve inside the training job
    minutes = minutes_at_steps(train_dir / "train.log")
    rows = []
    for step, ckpt in periodic_checkpoints(train_dir):
        with tempfile.TemporaryDirectory() as tmp:
            folder = export_lightning_checkpoint(train_cfg, ckpt, Path(tmp) / "checkpoint")
            eval_cfg = OmegaConf.merge(train_cfg, {"model": {"path": str(folder)}})
            summary = run_fidelity_benchmark(
                eval_cfg,
                run_dir / f"step_{step}",
                seeds_per_prompt=seeds_per_prompt,
                prompts_per_concept=prompts_per_concept,
                num_steps=num_steps,
                guidance_scale=guidance_scale,
                sampler=sampler,
                batch_size=batch_size,
                reader_cache_dir=reader_cache_dir or train_cfg.data.cache_dir,
            )
        rows.append(
            {
                "step": step,
                "minutes": minutes.get(step, math.nan),
                **{key: summary[key] for key in CURVE_METRICS},
                "concepts_recognised": summary["concepts_recognised"],
                "num_concepts": summary["num_concepts"],
            }
        )
        log.info(
            "step %d (%.1f min): attribute acc %.3f, all-attributes %.3f, rare hit %.3f, concepts %d/%d",
            step, rows[-1]["minutes"], *(summary[key] for key in CURVE_METRICS),
            summary["concepts_recognised"], summary["num_concepts"],
        )  # fmt: skip
    report.write_csv(run_dir / "fidelity_curve.csv", rows)
    timed = all(not math.isnan(r["minutes"]) for r in rows)
    table = report.markdown_table(
        ["step", "minutes", *CURVE_METRICS, "concepts recognised"],
        [
            [r["step"], f"{r['minutes']:.1f}", *(f"{r[k]:.3f}" for k in CURVE_METRICS),
             f"{r['concepts_recognised']}/{r['num_concepts']}"]
            for r in rows
        ],
    )  # fmt: skip
    report.write_text(run_dir / "fidelity_curve.md", f"Fidelity of {train_dir} over training.\n\n{table}\n")
    x = [r["minutes"] if timed else r["step"] for r in rows]
    png = report.line_plot(
        run_dir / "fidelity_curve.png",
        {key: (x, [r[key] for r in rows], None) for key in CURVE_METRICS},
        xlabel="training minutes" if timed else "step",
        ylabel="rate",
        ylim=(0, 1),
        grid=True,
        figsize=(6, 4),
        legend_size=None,
    )
    result = {"run": str(train_dir), "checkpoints": rows}
    report.with_headline(result, "rare_concept_hit_rate", rows[-1]["rare_concept_hit_rate"])
    report.write_json(run_dir / "metrics.json", result)
    report.log_to_wandb(
        cfg.get("logger"), tables={"fidelity_curve/checkpoints": rows}, images={"fidelity_curve/plot": png}
    )
    print(table)
    return result
