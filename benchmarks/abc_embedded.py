"""The embedded AbC benchmark in one command: build it, attribute every concept's queries with every
method, evaluate, print the table.

    python benchmarks/abc_embedded.py <base checkpoint> [--methods unlearning dtrak pixel random]
        [--out DIR] [--threads 1] [--objects star ...] [--styles sepia ...] [--queries-per-concept 4]
        [-- attribute.py overrides for every method, e.g. method.batch_size=128]

1. `build_abc_embedded` (data/abc_embedded.py): exemplars, one Custom Diffusion model per concept and
   its queries, cached under --cache-dir keyed by the base model's weights and the settings.
2. Per method and concept: `attribute.py experiment=abc_embedded method=<m> data.concept=<c> ...`
   (conf/method_preset/abc_embedded/<m>.yaml holds the tiny-model settings) into <out>/<m>/<c>; a run
   that already wrote ranking.json is kept (rerun the command to resume). A method without a config
   in conf/method/ is reported and skipped.
3. `evaluate.py benchmark=abc scores=[...]` into <out>/eval: Recall@5/10/100 and mAP per concept,
   per concept type and method; abc.md, abc_*.csv and the abc.png scatter.

    python benchmarks/abc_embedded.py <base checkpoint> --calibrate star sepia [--grid ...]

Calibration of the unlearning settings on a couple of concepts, with calibration queries (their own
prompts and seeds, never the evaluation queries), in process on a subset of the pool (the exemplars
plus --calibration-distractors random base images) so a grid point costs minutes: prints AP and
Recall@10 of the exemplars per (steps, step size, N) for the chosen concepts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from project_commands import run_project_command as run  # noqa: E402

from diffusion_attribution.data.abc_embedded import OBJECT_CONCEPTS, STYLE_CONCEPTS
from diffusion_attribution.evaluation.abc_embedded_build import AbcEmbeddedSettings, build_abc_embedded
from diffusion_attribution.models.weight_subsets import SUBSETS

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
    parser.add_argument("--calibrate", nargs="*", default=None, help="concepts to calibrate unlearning on")
    parser.add_argument("--calibration-distractors", type=int, default=300)
    parser.add_argument("--calibration-queries", type=int, default=2)
    parser.add_argument(
        "--grid",
        nargs="*",
        default=["1,0.0003,10", "1,0.001,10", "1,0.003,10", "3,0.001,10", "1,0.001,5"],
        help="unlearning settings 'steps,step_size,num_timesteps[,damping[,params[,update[,captions[,rise]]]]]' "
        "with N = the pool size (the update depends on step_size / N only, so N is not a separate axis); "
        "damping defaults to 0.1, params (the unlearned weight subset) to kv, update to fisher (or ekfac), "
        "captions (scored per pool image) to 0 (or all, or indices joined by +, e.g. 1+2), rise (a target "
        "query-loss rise: the step size is searched from step_size per query) to none",
    )
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
    if args.calibrate is not None:
        calibrate(root, args, settings)
        return

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


# ------------------------------------------------------------------------------------------ calibration
def calibrate(root: Path, args: argparse.Namespace, settings: AbcEmbeddedSettings) -> None:
    """Unlearning settings on calibration queries of a few concepts, scored on a subset of the pool."""
    import numpy as np

    from diffusion_attribution.attribution.unlearning.scores import unlearning_scores
    from diffusion_attribution.attribution.unlearning.step import preserved_parameters, unlearn
    from diffusion_attribution.curvature.diagonal import compute_fisher
    from diffusion_attribution.curvature.ekfac import compute_ekfac
    from diffusion_attribution.data.abc_embedded import AbcEmbeddedDataModule, query_prompts
    from diffusion_attribution.evaluation.retrieval import retrieval_metrics
    from diffusion_attribution.models.pipeline import TextToImageModel
    from diffusion_attribution.models.sampling import generate
    from diffusion_attribution.models.weight_subsets import select_parameters
    from diffusion_attribution.objective.sweep import per_sample_losses

    def pool_losses(model, dataset, ids, timesteps, captions: str):
        """The scoring sweep; `captions` is "all" or caption indices joined by "+"."""
        indices = None if captions == "all" else [int(c) for c in captions.split("+")]
        return per_sample_losses(model, dataset, ids, timesteps, indices, [False], batch_size=64)

    grid = []
    for point in args.grid:
        steps, alpha, num_t, *rest = point.split(",")
        damping = float(rest[0]) if rest else 0.1
        params = rest[1] if len(rest) > 1 else "kv"
        update = rest[2] if len(rest) > 2 else "fisher"
        captions = rest[3] if len(rest) > 3 else "0"
        rise = float(rest[4]) if len(rest) > 4 and rest[4] != "none" else None
        grid.append((int(steps), float(alpha), int(num_t), damping, params, update, captions, rise))
    results = []
    for concept in args.calibrate:
        model = TextToImageModel.from_pretrained(root / concept / "model").eval()
        datamodule = AbcEmbeddedDataModule(str(root), concept, resolution=model.image_resolution)
        dataset = datamodule.full_dataset()
        exemplars = datamodule.exemplar_ids
        rng = np.random.default_rng(0)
        others = sorted(rng.choice(exemplars[0], args.calibration_distractors, replace=False).tolist())
        ids = others + exemplars
        started = time.perf_counter()
        # The Fisher (or EK-FAC) over the whole pool, as attribute.py computes it, per weight subset.
        compute = {"fisher": compute_fisher, "ekfac": compute_ekfac}
        fishers = {
            (params, update): compute[update](
                model, datamodule.dataset, subset=params, batch_size=64, progress=False
            )
            for params, update in sorted({g[4:6] for g in grid})
        }
        fisher_s = time.perf_counter() - started
        num_t = int(model.scheduler.config.num_train_timesteps)
        grids = {t: list(range(0, num_t, num_t // t))[:t] for t in sorted({g[2] for g in grid})}
        before = {(g[2], g[6]): pool_losses(model, dataset, ids, grids[g[2]], g[6]) for g in grid}
        # Calibration queries: their own seed stream (settings.seed + 1), never the evaluation queries.
        prompts = query_prompts(concept, args.calibration_queries, settings.seed + 1)
        samples = generate(model, [p for p, _ in prompts], [s for _, s in prompts], **settings.sampler)
        target = [np.arange(len(others), len(ids))]
        num_train = float(datamodule.num_examples)
        for steps, step_size, num_t, damping, params, update, captions, rise in grid:
            point_started = time.perf_counter()
            selected, fisher = select_parameters(model.unet, params), fishers[(params, update)]
            aps, recalls, increases, rises, alphas, relative_aps = [], [], [], [], [], []
            for q, (prompt, _) in enumerate(prompts):
                with preserved_parameters(selected):
                    record = unlearn(
                        model,
                        samples.latents[q : q + 1],
                        prompt,
                        fisher,
                        selected,
                        steps=steps,
                        step_size=step_size,
                        num_samples=64 if steps > 1 else 256,
                        num_train=num_train,
                        damping=damping,
                        update=update,
                        seed=0,
                        target_loss_rise=rise,
                    )
                    after = pool_losses(model, dataset, ids, grids[num_t], captions)
                reference = before[(num_t, captions)]
                scores = unlearning_scores(reference, after).numpy()[None]
                (row,) = retrieval_metrics(scores, target, precision_at=(), recall_at=(10,))
                aps.append(row["ap"])
                recalls.append(row["recall@10"])
                # The same sweeps scored with method.score=log_ratio (the rise relative to the loss before)
                relative = unlearning_scores(reference, after, score="log_ratio").numpy()[None]
                (row,) = retrieval_metrics(relative, target, precision_at=(), recall_at=(10,))
                relative_aps.append(row["ap"])
                increases.append(record.loss_after - record.loss_before)
                rises.append(record.loss_after / record.loss_before - 1)
                alphas.append(record.step_sizes[0])
            line = {
                "concept": concept,
                "steps": steps,
                "step_size": step_size,
                "num_train": num_train,
                "num_timesteps": num_t,
                "damping": damping,
                "params": params,
                "update": update,
                "captions": captions,
                "target_loss_rise": rise,
                "first_step_sizes": alphas,
                "ap": float(np.mean(aps)),
                "recall@10": float(np.mean(recalls)),
                "query_loss_increase": float(np.mean(increases)),
                "query_loss_rise": [round(r, 3) for r in rises],
                "aps": [round(a, 3) for a in aps],
                "ap_log_ratio": float(np.mean(relative_aps)),
                "aps_log_ratio": [round(a, 3) for a in relative_aps],
                "fisher_s": fisher_s,
                "seconds_per_query": (time.perf_counter() - point_started) / len(prompts),
            }
            results.append(line)
            print(json.dumps(line), flush=True)
    out = ROOT / "outputs" / "abc_embedded_calibration" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(results, indent=2))
    print(f"Wrote {out / 'calibration.json'}")


if __name__ == "__main__":
    main()
