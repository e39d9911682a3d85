"""The leave-K-out quality figure on the affordable CPU world (experiment=leave_k_out_cpu), end to end:

    python scripts/reproduce/leave_k_out_cpu.py [--base <checkpoint>] [--methods unlearning dtrak pixel]
        [--k 6 12] [--random-draws 3] [--out DIR] [--threads 1] [-- evaluate.py overrides]

1. trains the preset's base model (`train.py experiment=leave_k_out_cpu`) unless --base is given;
2. checks what it draws (`evaluate.py benchmark=fidelity`: the rare-concept hit rate);
3. picks one query per rare concept: a prompt with the attributes of one of the concept's training
   images, the first of a few seeds whose image the attribute reader sees the concept in (a query the
   model did not draw its concept for has no ground truth worth removing);
4. attributes the queries with each method (`attribute.py experiment=leave_k_out_cpu method=...`) and
   scores the rankings (`evaluate.py benchmark=retrieval`, mAP for context);
5. runs `evaluate.py experiment=leave_k_out_cpu benchmark=leave_k_out scores=[...]` (retrains in-process,
   one after another, keyed and reused under .cache/retrains) and prints its table.

Every step is an ordinary command of the project, printed before it runs; summary.md under --out holds
the fidelity, retrieval, leave-K-out tables and wall times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from diffusion_attribution.data.shapes import prompt_for
from diffusion_attribution.jobs.commands import run_project_command

ROOT = Path(__file__).resolve().parents[2]  # the repository root, where the entry points are


def run(args: list[str], threads: int | None = None, done: Path | None = None) -> float:
    return run_project_command(args, ROOT, threads, done=done)


PRESET = "experiment=leave_k_out_cpu"


def pick_queries(checkpoint: Path, seeds_per_prompt: int, prompts_per_concept: int) -> list[dict]:
    """One drawn query per rare concept (see the module docstring), with what the reader saw."""
    import hydra
    from omegaconf import OmegaConf

    from diffusion_attribution.evaluation.attribute_reader import load_or_train_reader
    from diffusion_attribution.evaluation.fidelity import fidelity_prompts
    from diffusion_attribution.models.pipeline import TextToImageModel
    from diffusion_attribution.models.sampling import generate

    trained = OmegaConf.load(checkpoint / "training_config.yaml")
    datamodule = hydra.utils.instantiate(trained.data)
    reader, _ = load_or_train_reader(datamodule.world, trained.data.cache_dir)
    model = TextToImageModel.from_pretrained(checkpoint).eval()
    candidates = [
        p
        for p in fidelity_prompts(datamodule, 1, prompts_per_concept)
        if p.concept in datamodule.world.rare_concepts
    ]
    chosen = []
    for concept in datamodule.world.rare_concepts:
        options = [
            (prompt_for(p.colour, p.shape, p.background, concept), 100 + s)
            for p in candidates
            if p.concept == concept
            for s in range(seeds_per_prompt)
        ]
        images = generate(model, [o[0] for o in options], [o[1] for o in options]).images
        reads = [r["concept"] for r in reader.read(images)]
        hits = [k for k, r in enumerate(reads) if r == concept]
        k = hits[0] if hits else 0
        chosen.append(
            {"prompt": options[k][0], "seed": options[k][1], "concept": concept, "drawn": bool(hits)}
        )
        print(f"{concept}: {len(hits)}/{len(options)} candidates drawn; query {options[k]}", flush=True)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, default=None, help="a checkpoint trained with the preset")
    parser.add_argument("--methods", nargs="+", default=["unlearning", "dtrak", "pixel"])
    parser.add_argument("--k", nargs="+", type=int, default=None, help="default: the preset's benchmark.k")
    parser.add_argument("--random-draws", type=int, default=None)
    parser.add_argument("--seeds-per-prompt", type=int, default=4)
    parser.add_argument("--prompts-per-concept", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    extra = argv[split + 1 :]
    torch.set_num_threads(args.threads)
    out = (args.out or ROOT / "outputs" / "leave_k_out_cpu" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    walls: dict[str, float] = {}

    if args.base is None:
        base = out / "base" / "checkpoint"
        walls["train base"] = run(
            ["train.py", PRESET, f"hydra.run.dir={out / 'base'}"], args.threads, done=base
        )
    else:
        base = args.base.resolve()
    walls["fidelity"] = run(
        [
            "evaluate.py",
            PRESET,
            "benchmark=fidelity",
            f"model.path={base}",
            f"hydra.run.dir={out / 'fidelity'}",
        ],
        args.threads,
        done=out / "fidelity" / "metrics.json",
    )
    if (out / "queries.json").is_file():
        queries = json.loads((out / "queries.json").read_text())
    else:
        queries = pick_queries(base, args.seeds_per_prompt, args.prompts_per_concept)
        (out / "queries.json").write_text(json.dumps(queries, indent=2))
    query = [
        f"query.prompts={json.dumps([q['prompt'] for q in queries])}",
        f"query.seeds={json.dumps([q['seed'] for q in queries])}",
    ]
    runs, retrieval = [], {}
    for method in args.methods:
        run_dir = out / method
        walls[f"attribute {method}"] = run(
            [
                "attribute.py",
                PRESET,
                f"model.path={base}",
                f"method={method}",
                *query,
                f"hydra.run.dir={run_dir}",
            ],
            args.threads,
            done=run_dir / "ranking.json",
        )
        run(
            [
                "evaluate.py",
                PRESET,
                "benchmark=retrieval",
                f"scores={run_dir}",
                f"hydra.run.dir={run_dir}/retrieval",
            ],
            args.threads,
            done=run_dir / "retrieval" / "metrics.json",
        )
        retrieval[method] = json.loads((run_dir / "retrieval" / "metrics.json").read_text())
        runs.append(str(run_dir))
    options = [f"benchmark.k={json.dumps(args.k)}"] if args.k else []
    options += [f"benchmark.random_draws={args.random_draws}"] if args.random_draws is not None else []
    dry_run = any(o.startswith("benchmark.retrain.dry_run=true") for o in extra)
    lko_dir = out / ("leave_k_out_plan" if dry_run else "leave_k_out")
    walls["leave_k_out"] = run(
        ["evaluate.py", PRESET, "benchmark=leave_k_out", f"scores=[{','.join(runs)}]", *options, *extra,
         f"hydra.run.dir={lko_dir}"],
        args.threads,
        done=None if dry_run else lko_dir / "leave_k_out.md",
    )  # fmt: skip
    if dry_run:
        return

    fidelity = json.loads((out / "fidelity" / "metrics.json").read_text())
    lines = [
        f"Base model: {base}",
        f"Fidelity: attribute accuracy {fidelity['attribute_accuracy']:.3f}, rare-concept hit rate "
        f"{fidelity['rare_concept_hit_rate']:.3f}, concepts drawn {fidelity['concepts_recognised']}/{fidelity['num_concepts']}",
        f"Queries: {sum(q['drawn'] for q in queries)}/{len(queries)} show their concept (reader): "
        + "; ".join(f"{q['prompt']} (seed {q['seed']})" for q in queries),
        "",
        "Retrieval of the concept's training images (mAP ± s.e.): "
        + ", ".join(f"{m} {r['mean']['ap']:.3f} ± {r['sem']['ap']:.3f}" for m, r in retrieval.items()),
        "",
        (out / "leave_k_out" / "leave_k_out.md").read_text(),
        "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()),
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nWrote {out / 'summary.md'}")


if __name__ == "__main__":
    main()
