"""Unlearning settings calibrated on TUNING queries, never on the evaluation queries.

    python benchmarks/unlearning_calibration.py <checkpoint> [--settings '<json list>'] [--others 200]
        [--timesteps 0 200 400 600 800] [--first-seed 100] [--threads 1] [--show-top 20]

The evaluation queries of benchmarks/rare_concept_retrieval.py use sampling seeds from 0; this script
draws its own from --first-seed on (100 by default), one query per rare concept: the first seed whose
image the attribute reader reads as the asked-for concept. Scoring uses a subset of the training set
(every rare-concept image plus --others plain ones, so a sweep takes seconds, not minutes), the before
sweep and the Fisher once, then for every setting (a dict of `unlearn` arguments over the defaults of
conf/method/unlearning.yaml) unlearns each query, sweeps the subset again and prints the AP of the
concept's images within the subset (scored as the loss difference, and from the same sweeps as the
log ratio, method.score=log_ratio), the query's loss rise and the mean loss change of the rest.
A setting may also change the scoring sweep: "sweep_timesteps" (a list; default --timesteps) and
"sweep_captions" (caption indices, or "all"; default [0]); the before-sweep is redone for each.
APs within a subset are higher than over the whole training set; compare settings, not numbers.
--show-top N also prints, per setting and query, which concepts the top N of the ranking belong to.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from diffusion_attribution.attribution.unlearning.scores import unlearning_scores
from diffusion_attribution.attribution.unlearning.step import preserved_parameters, unlearn
from diffusion_attribution.curvature.diagonal import compute_fisher
from diffusion_attribution.curvature.ekfac import compute_ekfac
from diffusion_attribution.data.shapes import BACKGROUNDS, COLOURS, SHAPES, ShapesDataModule, prompt_for
from diffusion_attribution.evaluation.attribute_reader import load_or_train_reader
from diffusion_attribution.evaluation.retrieval import retrieval_metrics
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.models.sampling import generate
from diffusion_attribution.models.weight_subsets import select_parameters
from diffusion_attribution.objective.sweep import per_sample_losses

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SETTINGS = [
    {},
    {"step_size": 0.001},
    {"step_size": 0.01},
    {"damping": 0.01},
    {"damping": 1.0},
    {"params": "cross_attn"},
    {"num_samples": 1024},
]
UNLEARN_KEYS = (
    "params",
    "update",
    "steps",
    "step_size",
    "target_loss_rise",
    "num_samples",
    "num_train",
    "damping",
)


def drawn_queries(
    model: TextToImageModel, concepts: list[str], reader, first_seed: int, tries: int = 24
) -> list[tuple[str, str, int, torch.Tensor]]:
    """(concept, prompt, seed, final latent): per concept, the first seed from `first_seed` whose image
    shows it (the latent is kept so that the query is not generated a second time)."""
    rng = np.random.default_rng(first_seed)
    chosen = []
    for concept in concepts:
        colour, shape, background = (str(rng.choice(list(v))) for v in (COLOURS, SHAPES, BACKGROUNDS))
        prompt = prompt_for(colour, shape, background, concept)
        seeds = list(range(first_seed, first_seed + tries))
        samples = generate(model, [prompt] * tries, seeds, num_steps=30, guidance_scale=3.0)
        seen = [read["concept"] for read in reader.read(samples.images)]
        if concept in seen:
            k = seen.index(concept)
            chosen.append((concept, prompt, seeds[k], samples.latents[k : k + 1]))
        else:
            print(f"{concept}: not drawn in {tries} seeds; skipped", flush=True)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--settings", type=json.loads, default=DEFAULT_SETTINGS)
    parser.add_argument("--others", type=int, default=200)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[0, 200, 400, 600, 800])
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--show-top", type=int, default=0, help="print the concepts of each top N")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    trained = OmegaConf.load(args.checkpoint / "training_config.yaml").data
    data = ShapesDataModule(
        **{k: v for k, v in OmegaConf.to_container(trained, resolve=True).items() if k != "_target_"}
    )
    defaults = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / "unlearning.yaml"))
    defaults = {k: v for k, v in defaults.items() if k in UNLEARN_KEYS}
    model = TextToImageModel.from_pretrained(args.checkpoint).eval()
    source, dataset = data.source, data.full_dataset()
    concept_of = {i: source.metadata(i).get("concept") for i in range(len(source))}
    reader, _ = load_or_train_reader(data.world, ROOT / ".cache" / "data")
    queries = drawn_queries(model, list(data.world.rare_concepts), reader, args.first_seed)
    print("tuning queries:", [(p, s) for _, p, s, _ in queries], flush=True)

    rare = [i for i, c in concept_of.items() if c]
    plain = [i for i, c in concept_of.items() if not c]
    ids = rare + np.random.default_rng(0).choice(plain, args.others, replace=False).tolist()
    befores: dict[str, torch.Tensor] = {}

    def sweep(setting: dict) -> torch.Tensor:
        captions = setting.get("sweep_captions", [0])
        timesteps = setting.get("sweep_timesteps", args.timesteps)
        return per_sample_losses(
            model, dataset, ids, timesteps, None if captions == "all" else captions, [False], batch_size=64
        )

    def before_for(setting: dict) -> torch.Tensor:
        key = json.dumps([setting.get("sweep_captions"), setting.get("sweep_timesteps")])
        if key not in befores:
            started = time.perf_counter()
            befores[key] = sweep(setting)
            print(
                f"before-sweep {key} of {len(ids)} images: {time.perf_counter() - started:.0f} s", flush=True
            )
        return befores[key]

    fishers = {}

    print(
        "| setting | mAP (subset) | per-query AP | mAP, score log_ratio | query loss rise | mean Δloss rest "
        "| s/query |"
    )
    print("|---|---|---|---|---|---|---|")
    for setting in args.settings:
        cfg = {**defaults, **{k: v for k, v in setting.items() if not k.startswith("sweep_")}}
        before = before_for(setting)
        kind = (cfg["params"], cfg["update"] == "ekfac")
        if kind not in fishers:
            compute = compute_ekfac if cfg["update"] == "ekfac" else compute_fisher
            fishers[kind] = compute(model, data.dataset, subset=cfg["params"], batch_size=64)
        selected = select_parameters(model.unet, cfg["params"])
        aps, relative_aps, rises, rest, tops = [], [], [], [], []
        started = time.perf_counter()
        for concept, prompt, _, latent in queries:
            with preserved_parameters(selected):
                record = unlearn(
                    model,
                    latent,
                    prompt,
                    fishers[kind],
                    selected,
                    **{k: v for k, v in cfg.items() if k != "params"},
                )
                after = sweep(setting)
            scores = unlearning_scores(before, after)
            target = torch.tensor([concept_of[i] == concept for i in ids])
            # The project's AP, not torchmetrics' functional one: that counts a relevant item with a
            # score <= 0 (a loss that fell) as never retrieved, which misstates the AP of loss changes.
            (metrics,) = retrieval_metrics(scores[None].double().numpy(), [target.nonzero()[:, 0].numpy()])
            aps.append(metrics["ap"])
            relative = unlearning_scores(before, after, score="log_ratio")  # the same sweeps, log_ratio score
            (metrics,) = retrieval_metrics(relative[None].double().numpy(), [target.nonzero()[:, 0].numpy()])
            relative_aps.append(metrics["ap"])
            rises.append(record.loss_after / record.loss_before - 1)
            rest.append(float(scores[~target].mean()))
            if args.show_top:
                top = torch.argsort(scores, descending=True)[: args.show_top].tolist()
                counts = Counter(concept_of[ids[j]] or "plain" for j in top).most_common()
                tops.append(f"  {concept}: " + ", ".join(f"{c} {n}" for c, n in counts))
        seconds = (time.perf_counter() - started) / len(queries)
        print(
            f"| {json.dumps(setting)} | {np.mean(aps):.3f} | {' '.join(f'{a:.2f}' for a in aps)} | "
            f"{np.mean(relative_aps):.3f} | {np.mean(rises):+.1%} | {np.mean(rest):.2e} | {seconds:.0f} |",
            flush=True,
        )
        if tops:
            print(f"  concepts of each query's top {args.show_top}:\n" + "\n".join(tops), flush=True)


if __name__ == "__main__":
    main()
