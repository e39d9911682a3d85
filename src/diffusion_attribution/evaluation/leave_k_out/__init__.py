"""`evaluate.py benchmark=leave_k_out scores='[<attribute run>, ...]' benchmark.k='[...]'`: the
counterfactual test of attributions (PAPER.md, Evaluation). For every query, method and K, retrain the
model from scratch without the method's top-K training images (same recipe and seed, as Hydra jobs:
evaluation/retraining.py) and measure how much the retrained model lost the query:

- ΔL = L(ẑ, θ₋K) − L(ẑ, θ₀), the query's diffusion loss on a fine timestep grid (stride 5 of 1000)
  with noise fixed per (seed, query, timestep): identical for both models, so ΔL(θ₀, θ₀) = 0 exactly;
- ΔG: the query's prompt generated with the same seed and sampler by both models: pixel MSE (images in
  [0, 1]) and, with `benchmark.clip_path`, the CLIP image cosine similarity; on the embedded world also
  whether the attribute reader still sees the query's rare concept in the retrained model's image;
- retention: ΔL and ΔG of unrelated prompts (the retrained model should still draw them as before).

The random-removal baseline removes K ids drawn at random, `random_draws` sets per K. A random set
does not depend on the query, so each set is retrained once and evaluated on every query (per query,
the draws are averaged before the mean over queries). Results are means ± standard errors over
queries, per method and K: results.csv (one row per query × method × K × draw), leave_k_out.md (a
Table-1-style table), metrics.json, delta_loss_vs_k.png, before_after.png (and W&B tables/images with
logger=wandb). Where and how to retrain is the `benchmark.retrain` node shared with LDS
(conf/benchmark/retrain/default.yaml); `benchmark.retrain.dry_run=true` writes and prints the retrain plan
with its estimated compute and stops.

The package, one job per file: runs.py (the attribution runs and their queries), metrics.py (ΔL, ΔG and
the image judges), plan.py (the retrains asked for), summary.py (means ± s.e. and the tables),
figures.py (ΔL against K, before/after images), benchmark.py (`run_leave_k_out_benchmark`).
"""
