"""Exact per-sample gradients of Linear layers (and their squared sums) from ONE batched backward pass.

For a Linear layer y = W a + b applied to tokens, example b's gradient is G_b = Σ_tokens g_bt a_btᵀ
(g = ∂L/∂y): the layer's inputs a (saved by a forward hook) and output gradients g (saved by a
tensor hook) are all it takes. This is exact whenever the batch's examples do not interact, as in
a diffusers UNet (GroupNorm and attention are per example, no BatchNorm), and it costs one ordinary
forward + backward, where vmap over the whole UNet costs many times more on CPU. The cross-attention
key/value weights (the default unlearning subset) are Linear layers, so the Fisher takes this path;
subsets with convolutions fall back to vmap. TRAK-style methods take the per-sample gradients
themselves (`linear_per_sample_grads`), for any per-example output function, not only the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn


def linear_owners(
    unet: nn.Module, params: Mapping[str, torch.Tensor]
) -> dict[str, tuple[nn.Linear, str]] | None:
    """name -> (its nn.Linear, 'weight' | 'bias') if every selected parameter belongs to a Linear."""
    owners: dict[str, tuple[nn.Linear, str]] = {}
    for name in params:
        module_name, _, attr = name.rpartition(".")
        module = unet.get_submodule(module_name) if module_name else unet
        if not isinstance(module, nn.Linear) or attr not in ("weight", "bias"):
            return None
        owners[name] = (module, attr)
    return owners


def capture_linear_io(
    unet: nn.Module,
    modules: Mapping[str, nn.Linear],
    wrt: list[torch.Tensor],
    per_example_loss: Callable[[], torch.Tensor],
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per module name, the (input a, output gradient g) of every call of that Linear layer during
    one forward (`per_example_loss()`, returning [B] values) and the backward of their sum.

    `wrt` are the tensors the backward is taken for (the selected weights): only they track
    gradients, so the backward stops where nothing needs it.
    """
    inputs: dict[str, list[torch.Tensor]] = {k: [] for k in modules}
    grads: dict[str, list[torch.Tensor]] = {k: [] for k in modules}

    def hook_for(key: str) -> Callable[..., None]:
        def forward_hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            inputs[key].append(args[0].detach())
            output.register_hook(lambda g: grads[key].append(g.detach()))

        return forward_hook

    handles = [m.register_forward_hook(hook_for(k)) for k, m in modules.items()]
    flags = {p: p.requires_grad for p in unet.parameters()}
    try:
        for p in unet.parameters():
            p.requires_grad_(False)
        for p in wrt:
            p.requires_grad_(True)
        with torch.enable_grad():
            losses = per_example_loss()
            torch.autograd.grad(losses.sum(), wrt)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    out = {}
    for key in modules:
        calls_in, calls_grad = inputs[key], list(reversed(grads[key]))  # gradients arrive last call first
        if len(calls_in) != len(calls_grad):
            raise RuntimeError("A selected Linear layer's output did not receive a gradient on every call.")
        out[key] = list(zip(calls_in, calls_grad, strict=True))
    return out


def tokens(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A Linear layer's input or output gradient as [B, tokens, features]."""
    return x.reshape(x.shape[0], -1, x.shape[-1]).to(dtype)


def linear_per_sample_grads(
    unet: nn.Module,
    params: Mapping[str, torch.Tensor],
    per_example_loss: Callable[[], torch.Tensor],
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Exact per-example gradients {name: [B, *shape]} (in `dtype`) of Linear parameters θ, where
    `per_example_loss()` runs the forward pass and returns the [B] per-example values (a loss, or any
    other output function). Raises ValueError if a parameter is not a Linear's."""
    owners = linear_owners(unet, params)
    if owners is None:
        raise ValueError("Per-sample Linear gradients need parameters of nn.Linear layers only.")
    modules = {str(id(m)): m for m, _ in owners.values()}
    calls = capture_linear_io(unet, modules, [params[n] for n in owners], per_example_loss)
    per_module: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, pairs in calls.items():
        weight_grad, bias_grad = None, None
        for a, g in pairs:
            a3, g3 = tokens(a, dtype), tokens(g, dtype)
            w = torch.einsum("bno,bni->boi", g3, a3)
            b = g3.sum(1)
            weight_grad = w if weight_grad is None else weight_grad + w
            bias_grad = b if bias_grad is None else bias_grad + b
        per_module[key] = (weight_grad, bias_grad)  # type: ignore[assignment]
    out = {}
    for name, (module, attr) in owners.items():
        weight_grad, bias_grad = per_module[str(id(module))]
        out[name] = weight_grad if attr == "weight" else bias_grad
    return out


def linear_squared_grad_sums(
    unet: nn.Module,
    params: Mapping[str, torch.Tensor],
    per_example_loss: Callable[[], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Σ_b (∂L_b/∂θ)² (float64) for Linear parameters θ, where `per_example_loss()` runs the forward
    pass and returns the [B] per-example losses. Raises ValueError if a parameter is not a Linear's."""
    if linear_owners(unet, params) is None:
        raise ValueError("linear_squared_grad_sums needs parameters of nn.Linear layers only.")
    per_sample = linear_per_sample_grads(unet, params, per_example_loss, dtype=torch.float64)
    return {name: value.pow(2).sum(0) for name, value in per_sample.items()}
