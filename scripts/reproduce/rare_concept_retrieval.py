"""Rare-concept retrieval: rare-concept queries attributed by several methods, scored by retrieval.

    python scripts/reproduce/rare_concept_retrieval.py <checkpoint> [--methods unlearning pixel random]
        [--seeds 0] [--drawn-only] [--out DIR] [-- attribute.py overrides, e.g. method.step_size=1e-4]

For every rare concept of the checkpoint's embedded world it prompts "a <concept> <colour> <shape> on a
<background> background" (colour, shape and background drawn from a seeded generator), runs
`attribute.py` once per method with all these queries, then `evaluate.py benchmark=retrieval` on each
run (ground truth: the concept's training images). It prints per-query AP, mAP per method, the
unlearning retention check (query loss before/after, mean loss change of the training set) and the
time per query, and writes summary.md and retrieval.png under --out. The data settings come from the
checkpoint's training_config.yaml, so the ids line up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from diffusion_attribution.attribution.checks import LOADER_ONLY_DATA_KEYS, with_constructor_defaults
from diffusion_attribution.data.shapes import BACKGROUNDS, COLOURS, SHAPES, prompt_for
from diffusion_attribution.jobs.commands import run_project_command

ROOT = Path(__file__).resolve().parents[2]  # the repository root, where the entry points are


def run(args: list[str]) -> float:
    return run_project_command(args, ROOT)


def data_overrides(checkpoint: Path) -> tuple[list[str], list[str]]:
    """data.* overrides reproducing the checkpoint's training data, and its rare concepts."""
    trained = OmegaConf.load(checkpoint / "training_config.yaml")
    # Keys the checkpoint's config predates are its datamodule's defaults (what it was trained with).
    data = with_constructor_defaults(OmegaConf.to_container(trained.data, resolve=True))
    if "ShapesDataModule" not in str(data.get("_target_")):
        raise SystemExit(
            f"{checkpoint} was not trained on data=shapes: this benchmark needs the embedded world."
        )
    overrides = [
        f"data.{key}={json.dumps(value).replace(' ', '')}"
        for key, value in data.items()
        if key not in LOADER_ONLY_DATA_KEYS and key not in ("_target_", "resolution") and value is not None
    ]
    return overrides, list(data["rare_concepts"])


def checkpoint_datamodule(checkpoint: Path) -> Any:
    """The checkpoint's training data (its world: vocabulary and how it is drawn; the attribute
    reader must be the one for that world)."""
    from hydra.utils import instantiate

    return instantiate(OmegaConf.load(checkpoint / "training_config.yaml").data)


def concept_prompts(
    concepts: list[str], seeds: list[int], generator_seed: int = 0
) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(generator_seed)
    prompts, prompt_seeds = [], []
    for concept in concepts:
        for seed in seeds:
            colour = str(rng.choice(list(COLOURS)))
            shape = str(rng.choice(list(SHAPES)))
            background = str(rng.choice(list(BACKGROUNDS)))
            prompts.append(prompt_for(colour, shape, background, concept))
            prompt_seeds.append(int(seed))
    return prompts, prompt_seeds


def drawn_concept_prompts(
    checkpoint: Path, concepts: list[str], first_seed: int, tries: int = 24
) -> tuple[list[str], list[int]]:
    """The prompts of `concept_prompts(concepts, [first_seed])`, each with the first of `tries` seeds
    from `first_seed` whose image the attribute reader sees its concept in; a concept never drawn is
    left out, and said so."""
    from diffusion_attribution.evaluation.attribute_reader import load_or_train_reader
    from diffusion_attribution.models.pipeline import TextToImageModel
    from diffusion_attribution.models.sampling import generate

    reader, _ = load_or_train_reader(checkpoint_datamodule(checkpoint).world, ROOT / ".cache" / "data")
    model = TextToImageModel.from_pretrained(checkpoint).eval()
    prompts, seeds = [], []
    for concept, prompt in zip(concepts, concept_prompts(concepts, [first_seed])[0], strict=True):
        candidates = list(range(first_seed, first_seed + tries))
        samples = generate(model, [prompt] * tries, candidates, num_steps=30, guidance_scale=3.0)
        seen = [read["concept"] for read in reader.read(samples.images)]
        if concept in seen:
            prompts.append(prompt)
            seeds.append(candidates[seen.index(concept)])
        else:
            print(f"{concept}: not drawn in {tries} seeds; skipped", flush=True)
    print("drawn queries:", list(zip(prompts, seeds, strict=True)), flush=True)
    return prompts, seeds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--methods", nargs="+", default=["unlearning", "pixel", "random"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="sampling seeds per concept")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--drawn-only",
        action="store_true",
        help="per concept, the same prompt but the first seed from --seeds[0] on (24 tries) whose image "
        "the attribute reader sees the asked concept in (a query without its concept has no ground truth)",
    )
    # Everything after "--" goes to attribute.py for the unlearning runs (method=unlearning*, e.g.
    # method.curvature.damping=1).
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.overrides = argv[split + 1 :]
    checkpoint = args.checkpoint.resolve()
    out = (
        args.out or ROOT / "outputs" / "rare_concept_retrieval" / time.strftime("%Y-%m-%d_%H-%M-%S")
    ).resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: pick a new --out (results are never overwritten).")
    out.mkdir(parents=True, exist_ok=True)
    data, concepts = data_overrides(checkpoint)
    if args.drawn_only:
        prompts, seeds = drawn_concept_prompts(checkpoint, concepts, args.seeds[0])
    else:
        prompts, seeds = concept_prompts(concepts, args.seeds)
    query = [
        f"query.prompts={json.dumps(prompts)}",
        f"query.seeds={json.dumps(seeds)}",
        # each prompt's concept: attribute.py also writes metrics.json (retrieval mAP) for the run
        f"query.concepts={json.dumps([p.split()[1] for p in prompts])}",
    ]

    results: dict[str, dict] = {}
    for method in args.methods:
        run_dir = out / method
        extra = args.overrides if method.startswith("unlearning") else []
        wall = run(
            [
                "attribute.py",
                f"model.path={checkpoint}",
                f"method={method}",
                *data,
                *query,
                *extra,
                f"hydra.run.dir={run_dir}",
            ]
        )
        run(
            [
                "evaluate.py",
                "benchmark=retrieval",
                f"scores={run_dir}",
                *data,
                f"hydra.run.dir={run_dir}/retrieval",
            ]
        )
        ranking = json.loads((run_dir / "ranking.json").read_text())
        metrics = json.loads((run_dir / "retrieval" / "metrics.json").read_text())
        per_query = [
            {k: float(v) if k not in ("caption",) else v for k, v in row.items()}
            for row in _read_csv(run_dir / "retrieval" / "retrieval.csv")
        ]
        results[method] = {"wall_s": wall, "ranking": ranking, "metrics": metrics, "per_query": per_query}

    rendered = read_query_concepts(results[args.methods[0]]["ranking"], checkpoint)
    from diffusion_attribution.evaluation.retrieval import concept_index

    concepts_of_train = concept_index(checkpoint_datamodule(checkpoint))
    top_counts = {
        m: top_concept_counts(np.load(out / m / "scores.npy"), prompts, concepts_of_train)
        for m in args.methods
    }
    lines = summary_lines(results, prompts, rendered, top_counts)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    plot(results, prompts, out / "retrieval.png")
    print("\n".join(lines))
    print(f"\nWrote {out / 'summary.md'} and {out / 'retrieval.png'}")


def _read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_query_concepts(ranking: dict, checkpoint: Path) -> list[str]:
    """What the attribute reader sees in each generated query image: whether the model drew the
    concept it was asked for (if not, its training images are not what made the image)."""
    from PIL import Image

    from diffusion_attribution.evaluation.attribute_reader import load_or_train_reader

    reader, _ = load_or_train_reader(checkpoint_datamodule(checkpoint).world, ROOT / ".cache" / "data")
    images = [
        np.asarray(Image.open(q["saved_image"]).convert("RGB"), dtype=np.float32) for q in ranking["queries"]
    ]
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1
    return [read["concept"] for read in reader.read(batch)]


def top_concept_counts(
    scores: np.ndarray, prompts: list[str], concepts: dict[str, np.ndarray], top: int = 20
) -> tuple[int, int]:
    """Over all queries, how many of each top `top` are rare-concept images at all, and how many are
    images of the concept the query asked for (the retrieval benchmark's ground truth): whether a
    ranking finds rare concepts but mixes them up. `concepts`: evaluation.retrieval.concept_index."""
    from diffusion_attribution.evaluation.retrieval import relevant_ids_for

    rare_ids = np.concatenate(list(concepts.values()))
    rare = asked = 0
    for q, prompt in enumerate(prompts):
        wanted = relevant_ids_for({"caption": prompt}, concepts)
        ranked = np.argsort(-scores[q], kind="stable")[:top]
        rare += int(np.isin(ranked, rare_ids).sum())
        asked += int(np.isin(ranked, wanted).sum()) if wanted is not None else 0
    return rare, asked


def summary_lines(
    results: dict[str, dict],
    prompts: list[str],
    rendered: list[str],
    top_counts: dict[str, tuple[int, int]] | None = None,
) -> list[str]:
    methods = list(results)
    lines = [
        "| query | reader sees | " + " | ".join(f"AP {m}" for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for q, prompt in enumerate(prompts):
        cells = [f"{results[m]['per_query'][q]['ap']:.3f}" for m in methods]
        lines.append(f"| {prompt} | {rendered[q]} | " + " | ".join(cells) + " |")
    for name in ("ap", "precision@10", "recall@10", "recall@100"):
        label = "mAP" if name == "ap" else name
        cells = [
            f"{r['metrics']['mean'][name]:.3f} ± {r['metrics']['sem'][name]:.3f}" for r in results.values()
        ]
        lines.append(f"| **{label}** (all queries) | | " + " | ".join(cells) + " |")
    drawn = [q for q, prompt in enumerate(prompts) if f" {rendered[q]} " in f" {prompt} "]
    if drawn:
        cells = [f"{np.mean([results[m]['per_query'][q]['ap'] for q in drawn]):.3f}" for m in methods]
        lines.append(
            f"| **mAP, concept drawn** ({len(drawn)} of {len(prompts)}) | | " + " | ".join(cells) + " |"
        )
    if top_counts:
        cells = [f"{top_counts[m][0]} / {top_counts[m][1]}" for m in methods]
        lines.append(
            f"| top 20 of every query: rare-concept images / of the asked concept (of {20 * len(prompts)}) | | "
            + " | ".join(cells)
            + " |"
        )
    for method in (m for m in results if m.startswith("unlearning")):
        ranking = results[method]["ranking"]
        lines += [
            "",
            f"{method}, per query: the query's own loss before -> after, the mean loss change over the training"
            " set (retention: should be far below the top-10 change), the mean change of the top 10, seconds.",
            "",
            "| query | query loss | mean train Δloss | top-10 Δloss | s |",
            "|---|---|---|---|---|",
        ]
        for q in ranking["queries"]:
            d = q["diagnostics"]
            lines.append(
                f"| {q['caption']} | {d['loss_before']:.4f} -> {d['loss_after']:.4f} | "
                f"{d['mean_train_loss_change']:.2e} | {d['top10_train_loss_change']:.2e} | {d['seconds']:.1f} |"
            )
        timing = ranking["timing"]
        lines.append(
            f"\n{method} timing: prepare (Fisher + before-sweep, cached per model) {timing['prepare_s']:.1f} s, "
            f"scoring {timing['score_s']:.1f} s for {len(ranking['queries'])} queries "
            f"({timing['score_s'] / len(ranking['queries']):.1f} s per query); whole attribute.py run "
            f"{results[method]['wall_s']:.1f} s."
        )
    return lines


def plot(results: dict[str, dict], prompts: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(prompts)), 3.5))
    for k, method in enumerate(methods):
        aps = [row["ap"] for row in results[method]["per_query"]]
        ax.bar(np.arange(len(prompts)) + k * width, aps, width, label=f"{method} (mAP {np.mean(aps):.2f})")
    ax.set_xticks(np.arange(len(prompts)) + width * (len(methods) - 1) / 2)
    ax.set_xticklabels([p.split(" on ")[0].removeprefix("a ") for p in prompts], rotation=30, ha="right")
    ax.set_ylabel("average precision")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Rare-concept queries: retrieval of the concept's training images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
