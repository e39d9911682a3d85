"""The small sweep behind the tiny-model defaults of method=trak|dtrak|journeytrak.

    python benchmarks/trak_calibration.py <checkpoint> [--subsets kv attn] [--dims 1024 2048 4096 8192]
        [--relative-dampings 0.01 0.1 1 10 100 1000] [--generator-seed 1] [--seeds 100]
        [--out DIR] [--gradients DIR] [--threads 1]

Tuning queries, NOT the evaluation ones: one prompt per rare concept, its colour/shape/background
drawn with --generator-seed (1; benchmarks/rare_concept_retrieval.py uses 0) and sampling seeds
--seeds (100; the evaluation uses 0). Ground truth: the concept's training images (retrieval mAP).

For the first subset (kv) the exact gradients of every training example are computed once PER
TIMESTEP of {0, 100, ..., 900} (both output functions, first caption, noise keyed as in the method),
unprojected, so that any timestep set is their mean:
  A. unprojected ("k = d", computed in the N x N form φ(q)ᵀΦᵀ(ΦΦᵀ + λI)⁻¹, the same scores as the
     k x k form) for several timestep sets x λ;
  B. the 10-timestep set projected to each k (the method's own BlockwiseProjection, Gram factor and
     solve) x λ.
Further subsets (attn): 10 timesteps, unprojected x λ. λ is given relative to mean diag(ΦᵀΦ) =
Σ‖φ‖²/k, so that it means the same for every k; the table also shows the absolute λ (method.damping).
Methods: trak (loss / loss), dtrak (output norm / output norm), journeytrak (loss / the query's
trajectory at t = 400). Writes calibration.json and calibration.md under --out. --gradients keeps the
unprojected gradients (.npy, ~3 GB for kv) so that a rerun with other λ or k skips the backward passes.
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

from diffusion_attribution.attribution.queries import Query
from diffusion_attribution.attribution.trak.attributor.attributor import JourneyTRAKAttributor, TRAKAttributor
from diffusion_attribution.attribution.trak.attributor.kernel import gram_factor, kernel_solve
from diffusion_attribution.autograd.output_gradients import (
    per_sample_output_gradients,
    training_gradient_means,
)
from diffusion_attribution.autograd.projection import BlockwiseProjection
from diffusion_attribution.evaluation.retrieval import concept_index, retrieval_metrics  # noqa: E402
from diffusion_attribution.models.pipeline import TextToImageModel  # noqa: E402
from diffusion_attribution.models.sampling import generate  # noqa: E402
from diffusion_attribution.models.weight_subsets import select_parameters
from diffusion_attribution.objective.loss import encode_captions, evaluation_mode

METHODS = {
    "trak": ("loss", "loss"),
    "dtrak": ("output_norm", "output_norm"),
    "journeytrak": ("loss", "trajectory"),
}
TIMESTEPS = list(range(0, 1000, 100))
TIMESTEP_SETS = {
    "10: 0..900": TIMESTEPS,
    "5: 0,200..800": TIMESTEPS[::2],
    "5: 0..400": TIMESTEPS[:5],
    "5: 500..900": TIMESTEPS[5:],
    "1: 300": [300],
}


def datamodule_for(checkpoint: Path):
    import hydra
    from omegaconf import OmegaConf

    return hydra.utils.instantiate(OmegaConf.load(checkpoint / "training_config.yaml").data)


def flat(grads: dict[str, torch.Tensor], names: list[str], batch: int) -> torch.Tensor:
    return torch.cat([grads[n].reshape(batch, -1) for n in names], dim=1)


def train_gradients(model, data, params, output: str, timesteps: list[int]) -> torch.Tensor:
    """[len(timesteps), N, d] float32: each example's gradient at each timestep (first caption)."""
    dataset, names = data.full_dataset(), list(params)
    out = torch.zeros(len(timesteps), data.num_examples, sum(p.numel() for p in params.values()))
    started = time.perf_counter()
    with evaluation_mode(model):
        for begin in range(0, data.num_examples, 64):
            ids = list(range(begin, min(begin + 64, data.num_examples)))
            for k, t in enumerate(timesteps):
                grads = training_gradient_means(
                    model, dataset, ids, params, output, [t], [0], [False], seed=0
                )
                out[k, begin : begin + len(ids)] = flat(grads, names, len(ids)).float()
            done = begin + len(ids)
            print(
                f"  {output}: {done}/{data.num_examples} examples, "
                f"{done * len(timesteps) / (time.perf_counter() - started):.1f} points/s",
                flush=True,
            )
    return out


def query_gradients(model, params, queries, kind: str) -> torch.Tensor:
    """[P, Q, d] float64: the method's own query points (TRAKAttributor.query_points at every
    timestep of TIMESTEPS, or JourneyTRAKAttributor's one trajectory point), one gradient each."""
    attributor = JourneyTRAKAttributor() if kind == "trajectory" else TRAKAttributor()
    attributor.model, attributor.seed, attributor.resolved_timesteps = model, 0, TIMESTEPS
    output, names = ("loss" if kind == "trajectory" else kind), list(params)
    columns = []
    with evaluation_mode(model):
        for k, query in enumerate(queries):
            noisy, t, target, _ = attributor.query_points(query, k)
            text = encode_captions(model, [query.caption] * len(t))
            grads = per_sample_output_gradients(model.unet, params, noisy, t, text, output, target)
            columns.append(flat(grads, names, len(t)))
    return torch.stack(columns, dim=1)


def cached(folder: Path | None, name: str, identity: dict, compute) -> torch.Tensor:
    """compute(), kept as folder/name.npy when a folder is given (refused if made for other inputs)."""
    if folder is None:
        return compute()
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "identity.json"
    if meta.is_file() and json.loads(meta.read_text()) != identity:
        raise SystemExit(
            f"{folder} holds gradients of another checkpoint or queries: give another --gradients."
        )
    meta.write_text(json.dumps(identity))
    path = folder / f"{name}.npy"
    if path.is_file():
        print(f"  {name}: loaded from {path}", flush=True)
        return torch.from_numpy(np.load(path))
    value = compute()
    np.save(path, value.numpy())
    return value


def unprojected_scores(phi: torch.Tensor, q: torch.Tensor, train_ids: np.ndarray, relatives: list[float]):
    """{relative λ: (scores [Q, N], absolute λ)} for φ(q)ᵀ(TᵀT + λI)⁻¹Φᵀ, T = Φ's training rows,
    via (TᵀT + λI)⁻¹q = (q − Tᵀ(TTᵀ + λI)⁻¹Tq)/λ with one N x N Gram for every λ."""
    phi = phi.double()
    t = phi[torch.from_numpy(train_ids)]
    gram = t @ t.T
    tq = t @ q.T
    cross = phi @ t.T  # [N, Ntrain]
    direct = q @ phi.T  # [Q, N]
    out = {}
    for relative in relatives:
        damping = relative * float(gram.diagonal().sum()) / phi.shape[1]
        solve = torch.linalg.solve(gram + damping * torch.eye(len(t), dtype=gram.dtype), tq)  # [Ntrain, Q]
        out[relative] = (((direct - (cross @ solve).T) / damping).numpy(), damping)
    return out


def projected_scores(phi: torch.Tensor, q: torch.Tensor, train_ids: np.ndarray, relatives: list[float]):
    dim = phi.shape[1]
    rows = phi[torch.from_numpy(train_ids)].double()
    out = {}
    for relative in relatives:
        damping = relative * float(rows.pow(2).sum()) / dim
        factor = gram_factor([rows], dim, damping)
        out[relative] = ((kernel_solve(factor, q) @ phi.double().T).numpy(), damping)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--subsets", nargs="+", default=["kv", "attn"])
    parser.add_argument("--dims", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    parser.add_argument(
        "--relative-dampings", nargs="+", type=float, default=[0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]
    )
    parser.add_argument("--gradients", type=Path, default=None, help="folder to keep/reuse the gradients in")
    parser.add_argument("--generator-seed", type=int, default=1)
    parser.add_argument("--seeds", nargs="+", type=int, default=[100])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = (args.out or ROOT / "outputs" / "trak_calibration" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: pick a new --out.")
    out.mkdir(parents=True, exist_ok=True)

    checkpoint = args.checkpoint.resolve()
    model = TextToImageModel.from_pretrained(checkpoint).eval()
    data = datamodule_for(checkpoint)
    _, concepts = data_overrides(checkpoint)
    prompts, seeds = concept_prompts(concepts, args.seeds, generator_seed=args.generator_seed)
    samples = generate(model, prompts, seeds)
    sampler = {"sampler": "ddim", "num_steps": 30, "guidance_scale": 3.0}
    queries = [
        Query(p, samples.images[k], samples.latents[k], None, {"prompt": p, "seed": s, **sampler})
        for k, (p, s) in enumerate(zip(prompts, seeds, strict=True))
    ]
    index = concept_index(data)
    relevant = [index[next(c for c in concepts if f" {c} " in f" {p} ")] for p in prompts]
    train_ids = np.asarray(data.train_ids)
    results: list[dict] = []
    identity = {"checkpoint": str(checkpoint), "prompts": prompts, "seeds": seeds, "timesteps": TIMESTEPS}

    def record(stage: str, method: str, subset: str, tset: str, dim: int, scored: dict) -> None:
        for relative, (scores, damping) in scored.items():
            metrics = retrieval_metrics(scores, relevant)
            row = {
                "stage": stage, "method": method, "subset": subset, "timesteps": tset, "dim": dim,
                "relative_damping": relative, "damping": damping,
                "map": float(np.mean([m["ap"] for m in metrics])),
                "p@10": float(np.mean([m["precision@10"] for m in metrics])),
                "ap": [m["ap"] for m in metrics],
            }  # fmt: skip
            results.append(row)
            print(
                f"{stage} {method:>11} {subset:>4} t={tset:<14} k={dim:>6} λ={damping:.3g} (r={relative:g}): "
                f"mAP {row['map']:.3f}",
                flush=True,
            )
        (out / "calibration.json").write_text(
            json.dumps({"prompts": prompts, "seeds": seeds, "results": results})
        )

    for n, subset in enumerate(args.subsets):
        params = select_parameters(model.unet, subset)
        d = sum(p.numel() for p in params.values())
        per_step = n == 0  # per-timestep gradients (for the timestep sets) for the first subset only
        steps = TIMESTEPS if per_step else None
        started = time.perf_counter()

        def mean_gradients(output: str, params=params) -> torch.Tensor:
            """[1, N, d]: the 10-timestep mean directly (memory: one [N, d] per output)."""
            rows = []
            with evaluation_mode(model):
                for begin in range(0, data.num_examples, 64):
                    ids = list(range(begin, min(begin + 64, data.num_examples)))
                    grads = training_gradient_means(
                        model, data.full_dataset(), ids, params, output, TIMESTEPS, [0], [False], seed=0
                    )
                    rows.append(flat(grads, list(params), len(ids)).float())
                    print(f"  {output}: {begin + len(ids)}/{data.num_examples}", flush=True)
            return torch.cat(rows)[None]

        train = {}
        for o in ("loss", "output_norm"):
            if per_step:
                compute = lambda o=o, params=params: train_gradients(model, data, params, o, TIMESTEPS)  # noqa: E731
            else:
                compute = lambda o=o: mean_gradients(o)  # noqa: E731
            train[o] = cached(
                args.gradients, f"{subset}_train_{o}{'_per_step' if per_step else ''}", identity, compute
            )
        print(f"{subset}: train gradients in {time.perf_counter() - started:.0f} s", flush=True)
        query = {
            kind: query_gradients(model, params, queries, kind)
            for kind in ("loss", "output_norm", "trajectory")
        }
        sets = TIMESTEP_SETS if per_step else {"10: 0..900": TIMESTEPS}
        for tset, chosen in sets.items():
            positions = [TIMESTEPS.index(t) for t in chosen] if steps else [0]
            for method, (train_output, query_kind) in METHODS.items():
                phi = train[train_output][positions].mean(0)
                if query_kind == "trajectory":
                    q = query["trajectory"][0]
                else:
                    q = query[query_kind][[TIMESTEPS.index(t) for t in chosen]].mean(0)
                record(
                    "A",
                    method,
                    subset,
                    tset,
                    d,
                    unprojected_scores(phi, q, train_ids, args.relative_dampings),
                )
        if per_step:
            shapes = {name: p.shape for name, p in params.items()}
            names, sizes = list(params), [p.numel() for p in params.values()]
            for dim in [k for k in args.dims if k < d]:
                projection = BlockwiseProjection(shapes, dim, seed=0)

                def project(x: torch.Tensor, projection=projection, names=names, sizes=sizes) -> torch.Tensor:
                    parts = [x[i : i + 256] for i in range(0, len(x), 256)]
                    blocks = [
                        dict(zip(names, torch.split(p.double(), sizes, dim=1), strict=True)) for p in parts
                    ]
                    return torch.cat([projection.project(b) for b in blocks])

                started = time.perf_counter()
                features = {o: project(train[o].mean(0)).float() for o in train}
                print(f"k={dim}: projected in {time.perf_counter() - started:.0f} s", flush=True)
                for method, (train_output, query_kind) in METHODS.items():
                    q = query["trajectory"][0] if query_kind == "trajectory" else query[query_kind].mean(0)
                    scored = projected_scores(
                        features[train_output], project(q), train_ids, args.relative_dampings
                    )
                    record("B", method, subset, "10: 0..900", dim, scored)
        del train
    lines = [
        "| stage | method | subset | timesteps | k | λ relative | λ (method.damping) | mAP | P@10 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['stage']} | {r['method']} | {r['subset']} | {r['timesteps']} | {r['dim']} | "
            f"{r['relative_damping']:g} | {r['damping']:.3g} | {r['map']:.3f} | {r['p@10']:.2f} |"
        )
    (out / "calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"Wrote {out / 'calibration.md'}")


if __name__ == "__main__":
    main()
