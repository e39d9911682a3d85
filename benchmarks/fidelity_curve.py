"""Fidelity versus training time: export the EMA weights of every periodic checkpoint of a training
run (train.py ... training.keep_checkpoints=true) and run the fidelity benchmark on each.

    python benchmarks/fidelity_curve.py /path/to/train/run/dir [--seeds-per-prompt 2]

Prints a table (step, training minutes, attribute accuracy, rare-concept hit rate, concepts
recognised) and writes fidelity_curve.png/.csv into the run directory. Training minutes come from
the run's own progress log lines, so they are the run's wall clock on its machine.
"""

from __future__ import annotations

import argparse
import csv
import re
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from diffusion_attribution.evaluation.fidelity import run_fidelity_benchmark  # noqa: E402
from diffusion_attribution.training.fit import export_lightning_checkpoint  # noqa: E402


def minutes_at_steps(train_log: Path) -> dict[int, float]:
    found = {}
    for line in train_log.read_text().splitlines():
        m = re.search(r"step (\d+)/\d+ .* ([\d.]+) min elapsed", line)
        if m:
            found[int(m.group(1))] = float(m.group(2))
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seeds-per-prompt", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = OmegaConf.load(args.run_dir / ".hydra" / "config.yaml")
    cfg.pop("logger", None)  # its ${hydra:...} paths only resolve inside the training job
    minutes = minutes_at_steps(args.run_dir / "train.log")
    checkpoints = sorted((args.run_dir / "checkpoints").glob("step_*.ckpt"))
    if not checkpoints:
        raise SystemExit(
            f"No step_*.ckpt in {args.run_dir / 'checkpoints'}: train with training.keep_checkpoints=true."
        )
    rows = []
    for ckpt in checkpoints:
        step = int(ckpt.stem.split("_")[1])
        with tempfile.TemporaryDirectory() as tmp:
            folder = export_lightning_checkpoint(cfg, ckpt, Path(tmp) / "checkpoint")
            eval_cfg = OmegaConf.merge(cfg, {"model": {"path": str(folder)}})
            summary = run_fidelity_benchmark(
                eval_cfg,
                Path(tmp) / "fidelity",
                seeds_per_prompt=args.seeds_per_prompt,
                reader_cache_dir=cfg.data.cache_dir,
            )
        rows.append(
            {
                "step": step,
                "minutes": minutes.get(step, float("nan")),
                "attribute_accuracy": summary["attribute_accuracy"],
                "all_attributes_accuracy": summary["all_attributes_accuracy"],
                "rare_concept_hit_rate": summary["rare_concept_hit_rate"],
                "concepts_recognised": summary["concepts_recognised"],
            }
        )
        print(
            f"step {step:6d}  {rows[-1]['minutes']:6.1f} min  attribute acc {summary['attribute_accuracy']:.3f}  "
            f"all-attributes {summary['all_attributes_accuracy']:.3f}  rare hit {summary['rare_concept_hit_rate']:.3f}  "
            f"concepts {summary['concepts_recognised']}/{summary['num_concepts']}",
            flush=True,
        )
    with open(args.run_dir / "fidelity_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["minutes"] if r["minutes"] == r["minutes"] else r["step"] for r in rows]
    for key in ("attribute_accuracy", "all_attributes_accuracy", "rare_concept_hit_rate"):
        ax.plot(x, [r[key] for r in rows], marker="o", label=key)
    ax.set_xlabel("training minutes" if all(r["minutes"] == r["minutes"] for r in rows) else "step")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.run_dir / "fidelity_curve.png", dpi=120)
    print(f"Wrote {args.run_dir / 'fidelity_curve.png'} and fidelity_curve.csv")


if __name__ == "__main__":
    main()
