"""Unlearning step-size / damping calibration on a subset (80 rare-concept images + 200 others):
    python benchmarks/unlearning_calibration.py <checkpoint folder>
Prints, per rare-concept query generated from the model, the query's loss before/after unlearning
and the AP of the concept's training images within the subset, for several (step size, damping)."""

import sys
import time

import numpy as np
import torch
from torchmetrics.functional.retrieval import retrieval_average_precision as ap

from diffusion_attribution.data.shapes import ShapesDataModule, prompt_for
from diffusion_attribution.methods.weight_subsets import select_parameters
from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.models.sampling import generate
from diffusion_attribution.modules.fisher import compute_fisher
from diffusion_attribution.modules.loss_sweep import per_sample_losses, unlearning_scores
from diffusion_attribution.modules.unlearning import preserved_parameters, unlearn

m = TextToImageModel.from_pretrained(sys.argv[1]).eval()
dm = ShapesDataModule()
ds = dm.full_dataset()
src = dm.source
t0 = time.time()
sel = select_parameters(m.unet, "kv")
F = compute_fisher(m, dm.dataset, subset="kv", batch_size=64, progress=False)
print("fisher", time.time() - t0, F.mean())
concept = {i: src.metadata(i).get("concept") for i in range(len(src))}
rare = [i for i in concept if concept[i]]
rng = np.random.default_rng(0)
others = rng.choice([i for i in concept if not concept[i]], 200, replace=False).tolist()
ids = rare + others
ts = [0, 200, 400, 600, 800]
before = per_sample_losses(m, ds, ids, ts, [0], [False], batch_size=64)
queries = [("striped", "red", "square", "gray"), ("checkered", "blue", "circle", "white")]
prompts = [prompt_for(c, s, b, k) for k, c, s, b in queries]
gen = generate(m, prompts, [0, 1], 30, 3.0)
for q, (k, *_) in enumerate(queries):
    for alpha, damp in [(1e-2, 0.1), (1e-3, 0.1), (1e-4, 0.1), (1e-2, 10.0), (1e-3, 10.0)]:
        with preserved_parameters(sel):
            rec = unlearn(
                m,
                gen.latents[q : q + 1],
                prompts[q],
                F,
                sel,
                steps=1,
                step_size=alpha,
                num_samples=128,
                damping=damp,
            )
            after = per_sample_losses(m, ds, ids, ts, [0], [False], batch_size=64)
        sc = unlearning_scores(before, after)
        target = torch.tensor([concept[i] == k for i in ids])
        print(
            k,
            "step",
            alpha,
            "damping",
            damp,
            f"query loss {rec.loss_before:.4f}->{rec.loss_after:.4f}",
            f"AP {ap(sc, target).item():.3f}",
            f"mean dloss {sc.mean().item():.2e} top {sc.topk(10).values.mean().item():.2e}",
            flush=True,
        )
