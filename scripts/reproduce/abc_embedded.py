"""The embedded AbC benchmark in one command: build it, attribute every concept's queries with every
method, evaluate, print the table.

    python scripts/reproduce/abc_embedded.py <base checkpoint> [--methods unlearning dtrak pixel random]
        [--out DIR] [--threads 1] [--objects star ...] [--styles sepia ...] [--queries-per-concept 4]
        [-- attribute.py overrides for every method, e.g. method.batch_size=128]

1. `build_abc_embedded` (evaluation/abc_embedded_build.py): exemplars, one Custom Diffusion model per concept and
   its queries, cached under --cache-dir keyed by the base model's weights and the settings.
2. Per method and concept: `attribute.py experiment=abc_embedded method=<m> data.concept=<c> ...`
   (conf/method_preset/abc_embedded/<m>.yaml holds the tiny-model settings) into <out>/<m>/<c>; a run
   that already wrote ranking.json is kept (rerun the command to resume). A method without a config
   in conf/method/ is reported and skipped.
3. `evaluate.py benchmark=abc scores=[...]` into <out>/eval: Recall@5/10/100 and mAP per concept,
   per concept type and method; abc.md, abc_*.csv and the abc.png scatter.

Method settings are calibrated with attribute.py's own sweeps (`-m`, hydra/sweeper=optuna_search) on
calibration queries, never on these evaluation queries: the build writes each concept's
calibration_queries.jsonl and calibration_ids.txt (evaluation/abc_embedded_build.py, docs/calibration.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from diffusion_attribution.data.abc_embedded import OBJECT_CONCEPTS, STYLE_CONCEPTS
from diffusion_attribution.evaluation.abc_embedded_build import AbcEmbeddedSettings, build_abc_embedded
from diffusion_attribution.jobs.commands import run_project_command
from diffusion_attribution.models.weight_subsets import SUBSETS

ROOT = Path(__file__).resolve().parents[2]  # the repository root, where the entry points are


def run(args: list[str], threads: int | None = None, log_file: Path | None = None) -> float:
    return run_project_command(args, ROOT, threads, log_file)


DEFAULT_METHODS = ["unlearning", "dtrak", "pixel", "random"]


def attribute(root: Path, concept: str, method: str, out: Path, overrides: list[str], threads: int) -> dict:
    run_dir = out / method / concept
    if (run_dir / "ranking.json").is_file():
        print(f"kept {run_dir} (already done)", flush=True)
        return {"wall_s": None}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    wall = run(
        [
            "attribute.py",
            "experiment=abc_embedded",
            f"method={method}",
            f"data.root={root}",
            f"data.concept={concept}",
            f"model.path={root / concept / 'model'}",
            f"query.file={root / concept / 'queries.jsonl'}",
            "trainer.enable_progress_bar=false",
            *overrides,
            f"hydra.run.dir={run_dir}",
        ],
        threads,
        log_file=out / "logs" / f"attribute_{method}_{concept}.log",
    )
    return {"wall_s": wall}


def ranking_seconds(run_dir: Path) -> float | None:
    """Seconds the attributor reported in the run's ranking.json (prepare_s + score_s, the two phases
    jobs/attribute.py times), None if absent."""
    path = run_dir / "ranking.json"
    timing = (json.loads(path.read_text()).get("timing") or {}) if path.is_file() else {}
    if "prepare_s" not in timing or "score_s" not in timing:
        return None
    return timing["prepare_s"] + timing["score_s"]


def evaluate(run_dirs: list[Path], out: Path, threads: int) -> Path:
    eval_dir = out / "eval"
    if eval_dir.exists():
        eval_dir = out / f"eval_{time.strftime('%Y%m%d_%H%M%S')}"
    run(
        [
            "evaluate.py",
            "benchmark=abc",
            f"scores=[{','.join(str(d) for d in run_dirs)}]",
            f"hydra.run.dir={eval_dir}",
        ],
        threads,
        log_file=out / "logs" / "evaluate.log",
    )
    return eval_dir


def settings_from(args: argparse.Namespace) -> AbcEmbeddedSettings:
    return AbcEmbeddedSettings(
        objects=tuple(args.objects),
        styles=tuple(args.styles),
        exemplars_per_concept=args.exemplars,
        queries_per_concept=args.queries_per_concept,
        steps=args.customization_steps,
        params=args.customization_params,
        lr=args.customization_lr,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="the base model (trained on data=shapes)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--objects", nargs="*", default=list(OBJECT_CONCEPTS))
    parser.add_argument("--styles", nargs="*", default=list(STYLE_CONCEPTS))
    parser.add_argument("--exemplars", type=int, default=AbcEmbeddedSettings.exemplars_per_concept)
    parser.add_argument("--queries-per-concept", type=int, default=AbcEmbeddedSettings.queries_per_concept)
    parser.add_argument("--customization-steps", type=int, default=AbcEmbeddedSettings.steps)
    parser.add_argument(
        "--customization-params",
        default=AbcEmbeddedSettings.params,
        choices=list(SUBSETS),
        help="the UNet weights the customization trains (kv: Custom Diffusion's key/value projections)",
    )
    parser.add_argument("--customization-lr", type=float, default=AbcEmbeddedSettings.lr)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "abc_embedded")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    overrides = argv[split + 1 :]
    import torch

    torch.set_num_threads(args.threads)
    settings = settings_from(args)
    started = time.perf_counter()
    root = build_abc_embedded(args.checkpoint, args.cache_dir, settings)
    build_s = time.perf_counter() - started
    print(f"Benchmark built/found in {build_s:.0f} s: {root}", flush=True)

    out = (args.out or ROOT / "outputs" / "abc_embedded" / root.name).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    # Runs kept from an earlier call keep the wall time that call recorded.
    earlier = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() else {}
    timings: dict[str, dict[str, float | None]] = {}
    run_dirs = []
    for method in args.methods:
        if not (ROOT / "conf" / "method" / f"{method}.yaml").is_file():
            print(f"method={method}: no conf/method/{method}.yaml in this checkout; skipped.", flush=True)
            continue
        for concept in settings.concepts:
            timing = attribute(root, concept, method, out, overrides, args.threads)
            if timing["wall_s"] is None:
                timing["wall_s"] = earlier.get("attribute_wall_s", {}).get(method, {}).get(concept)
            timings.setdefault(method, {})[concept] = timing["wall_s"]
            run_dirs.append(out / method / concept)
    eval_dir = evaluate(run_dirs, out, args.threads)
    # Merged with the file as it is now: another call may have run other methods into the same --out.
    now = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() else {}
    merged = {**now.get("attribute_wall_s", {}), **timings}
    (out / "timings.json").write_text(json.dumps({"build_s": build_s, "attribute_wall_s": merged}, indent=2))
    print((eval_dir / "abc.md").read_text())
    for method, per_concept in timings.items():
        walls = [w for w in per_concept.values() if w is not None]
        if walls:
            print(
                f"{method}: {sum(walls) / 60:.1f} min of attribute.py for {len(walls)} concepts", flush=True
            )
        # A run linked in from another --out has no wall time here; its own ranking.json still says how
        # long the attributor took (preparing, then scoring: the process start and model load excluded).
        inside = [ranking_seconds(out / method / c) for c in per_concept]
        if all(s is not None for s in inside):
            print(
                f"{method}: {sum(inside):.0f} s inside the attributor (ranking.json timing)",
                flush=True,
            )
    print(f"\nBenchmark: {root}\nRuns: {out}\nTable: {eval_dir / 'abc.md'}\nPlot: {eval_dir / 'abc.png'}")


if __name__ == "__main__":
    main()
