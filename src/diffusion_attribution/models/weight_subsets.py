"""Which UNet weights attribution by unlearning moves (and the Fisher is computed for).

Selection is by module path in diffusers' UNet2DConditionModel: every transformer block
(BasicTransformerBlock) holds a self-attention `attn1` and a cross-attention `attn2`, each with
`to_q`, `to_k`, `to_v` and `to_out`. The text only enters the UNet through `attn2.to_k` and
`attn2.to_v`, which is why they are the default (as in Custom Diffusion and the paper).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

SUBSETS: dict[str, str] = {
    "kv": "cross-attention key and value projections (attn2.to_k, attn2.to_v)",
    "cross_attn": "every cross-attention layer (attn2: to_q, to_k, to_v, to_out)",
    "attn": "self- and cross-attention of every transformer block (attn1, attn2)",
    "all": "every UNet parameter",
}


def _in_module(name: str, *paths: tuple[str, ...]) -> bool:
    """True if the dotted parameter name passes through one of the module paths (consecutive parts)."""
    parts = name.split(".")
    for path in paths:
        width = len(path)
        if any(tuple(parts[i : i + width]) == path for i in range(len(parts) - width)):
            return True
    return False


_RULES: dict[str, Callable[[str], bool]] = {
    "kv": lambda name: _in_module(name, ("attn2", "to_k"), ("attn2", "to_v")),
    "cross_attn": lambda name: _in_module(name, ("attn2",)),
    "attn": lambda name: _in_module(name, ("attn1",), ("attn2",)),
    "all": lambda name: True,
}


def describe_subsets() -> str:
    return "; ".join(f"{key}: {text}" for key, text in SUBSETS.items())


def select_parameters(unet: nn.Module, subset: str = "kv") -> dict[str, nn.Parameter]:
    """The parameters of `subset` (see SUBSETS), keyed by their names in `unet.named_parameters()`.

    Biases are included where the layers have them. Pass the UNet itself (`model.unet`), not the
    whole text-to-image model: names are relative to the module given, and Fisher files use them.
    """
    if subset not in _RULES:
        raise ValueError(f"Unknown weight subset {subset!r}. Options: {describe_subsets()}.")
    rule = _RULES[subset]
    selected = {name: param for name, param in unet.named_parameters() if rule(name)}
    if not selected:
        raise ValueError(
            f"Weight subset {subset!r} selects no parameter of this {type(unet).__name__}: it has no "
            f"layers named as the subset expects (e.g. a UNet without cross-attention blocks). Choose "
            f"another subset. Options: {describe_subsets()}."
        )
    return selected


def count_parameters(params: dict[str, nn.Parameter]) -> int:
    return sum(p.numel() for p in params.values())
