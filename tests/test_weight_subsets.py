"""Weight subsets pick exactly the intended parameters of diffusers' UNet2DConditionModel."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from torch import nn

from diffusion_attribution.models.weight_subsets import SUBSETS, count_parameters, select_parameters


def small_unet(**overrides) -> UNet2DConditionModel:
    config = {
        "sample_size": 8,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (8, 16),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 1,
        "attention_head_dim": 4,
        "norm_num_groups": 4,
        "cross_attention_dim": 12,
    }
    config.update(overrides)
    torch.manual_seed(0)
    return UNet2DConditionModel(**config)


def names_of(unet: nn.Module, modules: list[nn.Module]) -> set[str]:
    """Parameter names of `modules` inside `unet`, found by identity (independent of name rules)."""
    wanted = {id(p) for module in modules for p in module.parameters()}
    return {name for name, p in unet.named_parameters() if id(p) in wanted}


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return small_unet()


def blocks(unet: nn.Module) -> list[BasicTransformerBlock]:
    found = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert found, "the test UNet must have transformer blocks"
    return found


def test_kv_is_cross_attention_keys_and_values(unet: UNet2DConditionModel) -> None:
    selected = select_parameters(unet, "kv")
    expected = names_of(unet, [m for b in blocks(unet) for m in (b.attn2.to_k, b.attn2.to_v)])
    assert set(selected) == expected
    # down, mid and two up transformer blocks, one weight each for to_k and to_v (no bias here)
    assert len(selected) == 2 * len(blocks(unet))
    assert all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in selected)
    for name, param in selected.items():
        assert param is dict(unet.named_parameters())[name]
        assert param.shape[1] == unet.config.cross_attention_dim  # they read the text states


def test_cross_attn_and_attn_subsets(unet: UNet2DConditionModel) -> None:
    cross = select_parameters(unet, "cross_attn")
    assert set(cross) == names_of(unet, [b.attn2 for b in blocks(unet)])
    assert {n.split("attn2.")[1].split(".")[0] for n in cross} == {"to_q", "to_k", "to_v", "to_out"}
    attn = select_parameters(unet, "attn")
    assert set(attn) == names_of(unet, [a for b in blocks(unet) for a in (b.attn1, b.attn2)])
    assert set(select_parameters(unet, "kv")) < set(cross) < set(attn)
    everything = select_parameters(unet, "all")
    assert list(everything) == [n for n, _ in unet.named_parameters()]
    assert count_parameters(everything) == sum(p.numel() for p in unet.parameters())


def test_biases_are_included() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn2 = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, bias=True)

    selected = select_parameters(Block(), "kv")
    assert set(selected) == {"attn2.to_k.weight", "attn2.to_k.bias", "attn2.to_v.weight", "attn2.to_v.bias"}


def test_unknown_subset_names_the_options(unet: UNet2DConditionModel) -> None:
    with pytest.raises(ValueError, match="'kq'.*Options: kv"):
        select_parameters(unet, "kq")


@pytest.mark.parametrize("subset", ["kv", "cross_attn", "attn"])
def test_unet_without_cross_attention_is_an_error(subset: str) -> None:
    plain = small_unet(
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
    )
    with pytest.raises(ValueError, match=f"{subset!r} selects no parameter.*Options"):
        select_parameters(plain, subset)
    assert select_parameters(plain, "all")


def test_every_documented_subset_is_accepted(unet: UNet2DConditionModel) -> None:
    for subset in SUBSETS:
        assert select_parameters(unet, subset)
