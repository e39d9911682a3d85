"""The after-unlearning loss sweep of a trained model, the current way and with the sweep's engine
options, side by side on the same unlearned models.

    python benchmarks/after_sweep.py --checkpoint RUN/checkpoint [--queries 4] [--ids N] [--configs ...]
        [--cache-dir DIR] [--threads 2]

Loads the checkpoint as jobs/attribute.py does (on the default world), prepares method=unlearning (the
diagonal Fisher, cached under --cache-dir), generates --queries images from the first training captions
and unlearns each with the method's Newton step. For every query's unlearned model it runs the sweep of
the first --ids training ids (default: all) x the method's timesteps x 1 caption in each configuration
and prints seconds per query, the speed-up over the current path, and the Spearman correlation and
top-10 overlap of the scores (loss after - loss before, each configuration's own before-sweep) with the
current path's. "current" is the sweep as it was: generator noise, no input cache, fp32. The engine's
configurations use the same generator noise values unless named "counter", so the correlation isolates the
engine's numerics (the counter ones show what the other noise changes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy.stats import spearmanr

from diffusion_attribution.attribution.base import AttributionContext
from diffusion_attribution.attribution.queries import build_queries
from diffusion_attribution.attribution.unlearning.scores import unlearning_scores
from diffusion_attribution.attribution.unlearning.step import preserved_parameters, unlearn
from diffusion_attribution.models.loading import model_from_config
from diffusion_attribution.objective.sweep import SweepEngine, per_sample_losses

CONF = Path(__file__).resolve().parents[1] / "conf"

# name -> (noise, input cache, precision, compile, channels_last, batch size)
CONFIGS = {
    "current": ("generator", False, "fp32", False, False, 64),
    "fp32": ("generator", True, "fp32", False, False, 64),
    "fp32+channels_last": ("generator", True, "fp32", False, True, 64),
    "fp32+compile": ("generator", True, "fp32", True, False, 64),
    "fp32 b256": ("generator", True, "fp32", False, False, 256),
    "fp32 bf16-cache": ("generator", True, "fp32", False, False, 64),  # inputs cached in bfloat16
    "bf16": ("generator", True, "bf16", False, False, 64),
    "bf16+compile": ("generator", True, "bf16", True, False, 64),
    "bf16+compile b256": ("generator", True, "bf16", True, False, 256),
    "counter fp32": ("counter", True, "fp32", False, False, 64),
    "counter bf16+compile": ("counter", True, "bf16", True, False, 64),
}


def _compare(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[list[float], list[int]]:
    """Per query: Spearman correlation and top-10 overlap of two score vectors."""
    rho = [float(spearmanr(x, y).statistic) for x, y in zip(a, b, strict=True)]
    overlap = [len(set(np.argsort(-x)[:10]) & set(np.argsort(-y)[:10])) for x, y in zip(a, b, strict=True)]
    return rho, overlap


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--ids", type=int, default=None, help="the first N training ids (default: all)")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), help=f"of {list(CONFIGS)}")
    parser.add_argument("--cache-dir", default=None, help="per-model cache (curvature, input cache)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"Unknown configurations {unknown}; options: {list(CONFIGS)}")
    configs = ["current"] + [c for c in args.configs if c != "current"]
    work = Path(tempfile.mkdtemp(prefix="after_sweep_"))
    cache = Path(args.cache_dir) if args.cache_dir else work / "cache"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("attribute", overrides=[f"model.path={args.checkpoint}"])
    datamodule = instantiate(cfg.data)
    model = model_from_config(cfg.model, require_path=True).eval()
    captions = list(dict.fromkeys(datamodule.source.captions(i)[0] for i in range(datamodule.num_examples)))
    query_cfg = OmegaConf.merge(
        cfg.query, {"prompts": captions[: args.queries], "seeds": list(range(args.queries))}
    )
    queries = build_queries(query_cfg, model, work / "queries", **cfg.query.sampler)
    ids = np.arange(datamodule.num_examples if args.ids is None else args.ids)
    attributor = instantiate(OmegaConf.to_container(cfg.method, resolve=True))
    context = AttributionContext(
        cache_dir=cache,
        run_dir=work / "run",
        trainer_kwargs={"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        seed=int(cfg.seed),
        candidate_ids=ids if len(ids) < datamodule.num_examples else None,
    )
    started = time.perf_counter()
    attributor.prepare(model, datamodule, context)  # curvature, input cache, a before-sweep
    print(f"prepare (curvature, input cache, before-sweep): {time.perf_counter() - started:.1f} s")
    sweep, dataset = attributor.sweep_config, attributor.dataset
    print(
        f"torch threads {torch.get_num_threads()}; {len(ids)} ids x {len(sweep.timesteps)} timesteps x "
        f"{len(sweep.caption_indices)} caption(s) x {len(sweep.flips)} flip(s) per sweep; {len(queries)} queries"
    )

    rounded = replace(  # the cache as method.input_cache_dtype=bfloat16 holds it
        attributor.inputs,
        inputs=attributor.inputs.inputs.to(torch.bfloat16),
        text_states=attributor.inputs.text_states.to(torch.bfloat16),
    )

    def run(name: str) -> torch.Tensor:
        noise, cached, precision, compiled, channels_last, batch = CONFIGS[name]
        inputs = (rounded if name.endswith("bf16-cache") else attributor.inputs) if cached else None
        return per_sample_losses(
            model,
            dataset,
            ids.tolist(),
            sweep.timesteps,
            sweep.caption_indices,
            sweep.flips,
            sweep.seed,
            batch_size=batch,
            noise=noise,
            precision=precision,
            inputs=inputs,
            engine=SweepEngine(compile=compiled, channels_last=channels_last),
        )

    before, first = {}, {}
    for name in configs:
        started = time.perf_counter()
        before[name] = run(name)  # each configuration's own before-sweep; compiles where asked
        first[name] = time.perf_counter() - started
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    scores: dict[str, list[np.ndarray]] = {name: [] for name in configs}
    for k, query in enumerate(queries):
        with preserved_parameters(attributor.selected):
            unlearn(
                model,
                query.latent[None].to(model.device),
                query.caption,
                attributor.curvature,
                attributor.selected,
                steps=attributor.steps,
                step_size=attributor.step_size,
                num_samples=attributor.num_samples,
                num_train=attributor._num_train(),
                seed=context.seed,
                chunk_size=attributor.chunk_size,
            )
            for name in configs:
                started = time.perf_counter()
                after = run(name)
                seconds[name].append(time.perf_counter() - started)
                scores[name].append(unlearning_scores(before[name], after, attributor.flip_reduction).numpy())
        print(f"query {k} ({query.caption!r}) done")
    base = float(np.mean(seconds["current"]))
    print(
        f"\n{'configuration':<22} {'s/query':>8} {'speed-up':>9} {'Spearman min/mean':>20} "
        f"{'top-10 overlap per query':>26} {'before-sweep s':>15}"
    )
    for name in configs:
        rho, overlap = _compare(scores[name], scores["current"])
        print(
            f"{name:<22} {np.mean(seconds[name]):8.2f} {base / np.mean(seconds[name]):8.2f}x "
            f"{min(rho):11.5f}/{np.mean(rho):.5f} {' '.join(f'{o}/10' for o in overlap):>26} {first[name]:15.1f}"
        )
    for name in configs:  # bf16 against the same noise in fp32 (with the input cache)
        noise, cached, precision = CONFIGS[name][:3]
        if precision != "bf16":
            continue
        twin = next((n for n in configs if CONFIGS[n][:3] == (noise, cached, "fp32")), None)
        if twin is not None:
            rho, overlap = _compare(scores[name], scores[twin])
            print(f"{name} vs {twin}: Spearman min {min(rho):.5f}, top-10 overlap {overlap}")


if __name__ == "__main__":
    main()
