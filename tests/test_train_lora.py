"""LoRA helpers for trainers: inject, collect as kohya, load back, eject."""

from __future__ import annotations

import copy

import pytest
import torch

from studio.errors import InvalidInputError
from studio.families import SD1, SDXL
from trainers.core.lora import (
    eject_lora,
    inject_lora,
    kohya_state_dict,
    load_kohya_state_dict,
    lora_parameters,
)


def _unet_out(unet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    text = torch.randn(1, 5, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(sample, torch.tensor([10]), encoder_hidden_states=text).sample


def test_fresh_lora_is_a_no_op_and_only_lora_trains(tiny_sd1_pipe):
    unet = copy.deepcopy(tiny_sd1_pipe.unet)
    before = _unet_out(unet)
    paths = inject_lora(unet, rank=4, alpha=4.0, targets=SD1.unet_lora_targets, seed=0)
    expected = [n for n, _ in copy.deepcopy(tiny_sd1_pipe.unet).named_modules() if n.endswith(SD1.unet_lora_targets)]
    assert paths == expected
    assert torch.allclose(_unet_out(unet), before)
    trainable = {id(p) for p in unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_parameters(unet)}


def test_kohya_round_trip_reproduces_the_trained_output_and_eject_restores_the_base(tiny_sd1_pipe):
    unet = copy.deepcopy(tiny_sd1_pipe.unet)
    base_out = _unet_out(unet)
    inject_lora(unet, rank=2, alpha=1.0, targets=["to_q", "to_v"], seed=0)
    with torch.no_grad():
        for param in lora_parameters(unet):
            param.normal_(0, 0.3)
    trained_out = _unet_out(unet)
    assert not torch.allclose(trained_out, base_out)
    tensors = kohya_state_dict(SD1, unet)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{key}.lora_down.weight"].shape == (2, 32)
    assert float(tensors[f"{key}.alpha"]) == 1.0

    other = copy.deepcopy(tiny_sd1_pipe.unet)
    inject_lora(other, rank=2, alpha=1.0, targets=["to_q", "to_v"], seed=5)
    layers = len(tensors) // 3
    assert load_kohya_state_dict(SD1, tensors, other) == layers
    assert torch.allclose(_unet_out(other), trained_out, atol=1e-6)

    assert eject_lora(unet) == layers
    assert not any("lora" in name for name, _ in unet.named_modules())
    assert torch.allclose(_unet_out(unet), base_out)


def test_load_refuses_a_state_from_another_configuration(tiny_sd1_pipe):
    unet = copy.deepcopy(tiny_sd1_pipe.unet)
    inject_lora(unet, rank=2, alpha=2.0, targets=["to_q"], seed=0)
    tensors = kohya_state_dict(SD1, unet)
    other = copy.deepcopy(tiny_sd1_pipe.unet)
    inject_lora(other, rank=4, alpha=4.0, targets=["to_q"], seed=0)
    with pytest.raises(InvalidInputError, match="shapes"):
        load_kohya_state_dict(SD1, tensors, other)


def test_sdxl_keys_use_sgm_names_and_text_encoder_prefixes(tiny_sdxl_pipe):
    pipe = copy.deepcopy(tiny_sdxl_pipe)
    inject_lora(pipe.unet, rank=2, alpha=2.0, targets=SDXL.unet_lora_targets, seed=0)
    inject_lora(pipe.text_encoder_2, rank=2, alpha=2.0, targets=SDXL.text_lora_targets, seed=1)
    tensors = kohya_state_dict(SDXL, pipe.unet, [None, pipe.text_encoder_2])
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for k in tensors)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") for k in tensors)
    assert not any(k.startswith("lora_te1_") for k in tensors)


def test_targets_that_match_nothing_are_a_clear_error(tiny_sd1_pipe):
    with pytest.raises(InvalidInputError, match="match no module"):
        inject_lora(copy.deepcopy(tiny_sd1_pipe.unet), rank=2, alpha=2.0, targets=["no_such_layer"])
