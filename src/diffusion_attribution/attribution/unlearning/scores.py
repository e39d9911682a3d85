"""TODO docstring (diffusion_attribution.objective.sweep)."""

from __future__ import annotations

import torch

FLIP_REDUCTIONS = ("max", "mean", "min")


# How an example's loss change becomes its score. "difference": after − before, the paper's score.
# "log_ratio": log(after / before), the relative rise: an example the model fits closely (a low loss,
# e.g. a customized model's own exemplars) counts its rise against that loss, and examples whose
# loss is high everywhere (busy images) no longer win by their scale alone.
SCORES = ("difference", "log_ratio")


def reduce_flips(losses: torch.Tensor, how: str = "max") -> torch.Tensor:
    """Reduce the last (flip) dimension: 'max' (the paper: score flipped and unflipped images, keep
    the higher), 'mean' or 'min'."""
    if how not in FLIP_REDUCTIONS:
        raise ValueError(f"Unknown flip reduction {how!r}; options: {FLIP_REDUCTIONS}.")
    if how == "max":
        return losses.max(dim=-1).values
    if how == "min":
        return losses.min(dim=-1).values
    return losses.mean(dim=-1)


def unlearning_scores(
    before: torch.Tensor, after: torch.Tensor, flip_reduction: str = "max", score: str = "difference"
) -> torch.Tensor:
    """Attribution scores [num_examples] from two sweeps [num_examples, captions, flips]: the loss
    change (after − before, or log(after / before) with score="log_ratio"; see SCORES) averaged over
    the captions each example has (NaN slots skipped), then reduced over flips. Higher = more
    influential."""
    if score not in SCORES:
        raise ValueError(f"Unknown unlearning score {score!r}; options: {SCORES}.")
    if before.shape != after.shape:
        raise ValueError(f"Loss sweeps differ in shape: {tuple(before.shape)} vs {tuple(after.shape)}.")
    if before.dim() != 3:
        raise ValueError("Expected loss sweeps of shape [num_examples, num_captions, num_flips].")
    before, after = before.double(), after.double()
    if score == "log_ratio":  # a loss of exactly 0 would give log 0; the smallest double stands in
        tiny = torch.finfo(torch.float64).tiny
        change = after.clamp_min(tiny).log() - before.clamp_min(tiny).log()
    else:
        change = after - before
    per_flip = torch.nanmean(change, dim=1)
    return reduce_flips(per_flip, flip_reduction).to(torch.float32)
