"""The small sweep behind the tiny-model defaults of method=trak|dtrak|journeytrak.

    python benchmarks/trak_calibration.py <checkpoint> [--subsets kv attn] [--dims 1024 2048 4096 8192]
        [--relative-dampings 1e-3 1e-2 1e-1 1 10] [--num-timesteps 10] [--generator-seed 1]
        [--seeds 100] [--out DIR] [--threads 1]

Tuning queries, NOT the evaluation ones: one prompt per rare concept, its colour/shape/background
drawn with --generator-seed (1; benchmarks/rare_concept_retrieval.py uses 0) and sampling seeds
--seeds (100; the evaluation uses 0). For each weight subset the exact mean gradients of every
training example (both output functions, the default timesteps and first caption, noise keyed as in
the method) are computed once, unprojected; then for each projection dimension k (the method's own
BlockwiseProjection, Gram factor and solve) and each λ = r · mean diag(ΦᵀΦ) the queries are scored and
their retrieval mAP computed (ground truth: the concept's training images), for trak (loss / loss),
dtrak (output norm / output norm) and journeytrak (loss / the query's trajectory at t = 400). "k = d"
is the unprojected limit, computed in the N x N form (φ(q)ᵀΦᵀ(ΦΦᵀ + λI)⁻¹, the same scores).
Writes calibration.json and calibration.md under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from rare_concept_retrieval import concept_prompts, data_overrides  # noqa: E402

from diffusion_attribution.data.queries import Query  # noqa: E402
from diffusion_attribution.evaluation.retrieval import concept_index, retrieval_metrics  # noqa: E402
from diffusion_attribution.methods.trak import (  # noqa: E402
    JourneyTRAKAttributor,
    TRAKAttributor,
    gram_factor,
    kernel_solve,
)
from diffusion_attribution.methods.weight_subsets import select_parameters  # noqa: E402
from diffusion_attribution.models.pipeline import TextToImageModel  # noqa: E402
from diffusion_attribution.models.sampling import generate  # noqa: E402
from diffusion_attribution.modules.fisher import evaluation_mode  # noqa: E402
from diffusion_attribution.modules.output_gradients import (  # noqa: E402
    point_gradient_means,
    training_gradient_means,
)
from diffusion_attribution.modules.projection import BlockwiseProjection  # noqa: E402

METHODS = {
    "trak": ("loss", "loss"),
    "dtrak": ("output_norm", "output_norm"),
    "journeytrak": ("loss", "trajectory"),
}


def datamodule_for(checkpoint: Path):
    import hydra
    from omegaconf import OmegaConf

    trained = OmegaConf.load(checkpoint / "training_config.yaml")
    return hydra.utils.instantiate(trained.data)


def mean_gradients(
    model, data, params, output: str, timesteps: list[int], batch_size: int = 64
) -> torch.Tensor:
    """[N, d] float32 mean gradients of every example (chunks of 64 examples)."""
    dataset = data.full_dataset()
    names = list(params)
    rows = []
    started = time.perf_counter()
    with evaluation_mode(model):
        for begin in range(0, data.num_examples, 64):
            ids = list(range(begin, min(begin + 64, data.num_examples)))
            grads = training_gradient_means(
                model, dataset, ids, params, output, timesteps, [0], [False], seed=0, batch_size=batch_size
            )
            rows.append(torch.cat([grads[n].reshape(len(ids), -1) for n in names], dim=1).float())
            done = begin + len(ids)
            rate = done / (time.perf_counter() - started)
            print(f"  {output}: {done}/{data.num_examples} examples ({rate:.2f}/s)", flush=True)
    return torch.cat(rows)


def query_gradients(model, params, queries, timesteps: list[int], kind: str) -> torch.Tensor:
    """[Q, d] float64: the method's own query points (TRAKAttributor / JourneyTRAKAttributor)."""
    attributor = JourneyTRAKAttributor() if kind == "trajectory" else TRAKAttributor()
    attributor.model, attributor.seed, attributor.resolved_timesteps = model, 0, timesteps
    output = "loss" if kind == "trajectory" else kind
    names = list(params)
    rows = []
    with evaluation_mode(model):
        for k, query in enumerate(queries):
            noisy, t, target, _ = attributor.query_points(query, k)
            grads = point_gradient_means(model, params, noisy, t, [query.caption] * len(t), output, target)
            rows.append(torch.cat([grads[n].reshape(-1) for n in names]))
    return torch.stack(rows)


def scores_for(
    train: torch.Tensor, queries: torch.Tensor, train_ids: np.ndarray, relative: float
) -> np.ndarray:
    """Unprojected: φ(q)ᵀΦᵀ(ΦΦᵀ + λI)⁻¹ over the training rows, the same as the k x k form."""
    phi = train.double()
    t = phi[torch.from_numpy(train_ids)]
    gram = t @ t.T
    damping = relative * float(gram.diagonal().sum()) / phi.shape[1]
    gram.diagonal().add_(damping)
    # (ΦᵀΦ + λI)⁻¹Φᵀ... for all columns: K⁻¹ φ(z) = (φ(z) − Tᵀ(TTᵀ + λI)⁻¹Tφ(z)) / λ
    q = queries.double()
    solve = torch.linalg.solve(gram, t @ q.T)  # [Ntrain, Q]
    qk = (q.T - t.T @ solve) / damping  # [d, Q]
    return (qk.T @ phi.T).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--subsets", nargs="+", default=["kv", "attn"])
    parser.add_argument("--dims", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    parser.add_argument("--relative-dampings", nargs="+", type=float, default=[1e-3, 1e-2, 1e-1, 1.0, 10.0])
    parser.add_argument("--num-timesteps", type=int, default=10)
    parser.add_argument("--generator-seed", type=int, default=1)
    parser.add_argument("--seeds", nargs="+", type=int, default=[100])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint.resolve()
    out = (args.out or ROOT / "outputs" / "trak_calibration" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: pick a new --out.")
    out.mkdir(parents=True, exist_ok=True)

    model = TextToImageModel.from_pretrained(checkpoint).eval()
    data = datamodule_for(checkpoint)
    _, concepts = data_overrides(checkpoint)
    prompts, seeds = concept_prompts(concepts, args.seeds, generator_seed=args.generator_seed)
    samples = generate(model, prompts, seeds)
    queries = [
        Query(
            p,
            samples.images[k],
            samples.latents[k],
            None,
            {"prompt": p, "seed": s, "sampler": "ddim", "num_steps": 30, "guidance_scale": 3.0},
        )
        for k, (p, s) in enumerate(zip(prompts, seeds, strict=True))
    ]
    index = concept_index(data)
    relevant = [index[next(c for c in concepts if f" {c} " in f" {p} ")] for p in prompts]
    timesteps = list(range(0, 1000, 1000 // args.num_timesteps))[: args.num_timesteps]
    train_ids = np.asarray(data.train_ids)
    results = []
    for subset in args.subsets:
        params = select_parameters(model.unet, subset)
        d = sum(p.numel() for p in params.values())
        shapes = {n: p.shape for n, p in params.items()}
        train = {o: mean_gradients(model, data, params, o, timesteps) for o in ("loss", "output_norm")}
        query = {
            kind: query_gradients(model, params, queries, timesteps, kind)
            for kind in ("loss", "output_norm", "trajectory")
        }
        for method, (train_output, query_kind) in METHODS.items():
            for dim in [*[k for k in args.dims if k < d], d]:
                started = time.perf_counter()
                if dim == d:
                    phi, phi_q = train[train_output], query[query_kind]
                else:
                    projection = BlockwiseProjection(shapes, dim, seed=0)
                    names = list(params)
                    sizes = [shapes[n].numel() for n in names]

                    def split(x: torch.Tensor, names=names, sizes=sizes) -> dict[str, torch.Tensor]:
                        return dict(zip(names, torch.split(x.double(), sizes, dim=1), strict=True))

                    phi = torch.cat(
                        [
                            projection.project(split(train[train_output][i : i + 256]))
                            for i in range(0, len(train[train_output]), 256)
                        ]
                    ).float()
                    phi_q = projection.project(split(query[query_kind]))
                project_s = time.perf_counter() - started
                for relative in args.relative_dampings:
                    if dim == d:
                        scores = scores_for(phi, phi_q, train_ids, relative)
                        damping = relative * float(phi[train_ids].double().pow(2).sum()) / dim
                    else:
                        rows = phi[torch.from_numpy(train_ids)].double()
                        damping = relative * float(rows.pow(2).sum()) / dim
                        factor = gram_factor([rows], dim, damping)
                        scores = (kernel_solve(factor, phi_q) @ phi.double().T).numpy()
                    metrics = retrieval_metrics(scores, relevant)
                    ap = [m["ap"] for m in metrics]
                    row = {
                        "method": method,
                        "subset": subset,
                        "weights": d,
                        "dim": dim,
                        "relative_damping": relative,
                        "damping": damping,
                        "map": float(np.mean(ap)),
                        "ap": ap,
                        "project_s": project_s,
                        "p@10": float(np.mean([m["precision@10"] for m in metrics])),
                    }
                    results.append(row)
                    print(
                        f"{method:>11} {subset:>4} k={dim:>6} λ={damping:.3g} (r={relative:g}): mAP {row['map']:.3f}",
                        flush=True,
                    )
                (out / "calibration.json").write_text(
                    json.dumps({"prompts": prompts, "seeds": seeds, "results": results}, indent=2)
                )
    lines = ["| method | subset | k | λ (relative) | λ | mAP | P@10 |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['subset']} | {r['dim']} | {r['relative_damping']:g} | {r['damping']:.3g} | "
            f"{r['map']:.3f} | {r['p@10']:.2f} |"
        )
    (out / "calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"Wrote {out / 'calibration.md'}")


if __name__ == "__main__":
    main()
