"""TODO docstring (diffusion_attribution.autograd.output_gradients)."""

from __future__ import annotations

import torch

from diffusion_attribution.objective.loss import per_example_loss

OUTPUT_FUNCTIONS = {
    "loss": "the training loss, mean squared error of the model output against its target (TRAK)",
    "output_norm": "the squared norm of the model output, averaged over pixels (D-TRAK)",
}


def check_output(output: str) -> str:
    if output not in OUTPUT_FUNCTIONS:
        options = "; ".join(f"{k}: {v}" for k, v in OUTPUT_FUNCTIONS.items())
        raise ValueError(f"Unknown output function {output!r}. Options: {options}.")
    return output


def output_values(
    prediction: torch.Tensor,
    output: str,
    target: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The output function per example [B] from the model's prediction (`mask`: [1, H, W] weights)."""
    if output == "loss":
        if target is None:
            raise ValueError("The loss output function needs the target.")
        return per_example_loss(prediction, target, mask)
    if output == "output_norm":
        return per_example_loss(prediction, torch.zeros_like(prediction), mask)
    return check_output(output)  # raises
