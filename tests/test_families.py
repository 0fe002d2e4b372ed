"""Model families: detection, components, and kohya names that other tools (A1111, ComfyUI, diffusers) read."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig

from studio.errors import InvalidInputError
from studio.families import SD1, SD2, SDXL, detect_family, family_by_name, iter_lora_layers, text_module_path
from studio.testing import build_tiny_sd1_pipeline, build_tiny_sdxl_pipeline, sd15_unet_config

# The real SDXL-base U-Net layout (the numbers kohya's SGM names depend on).
SDXL_UNET_CONFIG = {
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
}


def meta_unet(config: dict) -> UNet2DConditionModel:
    # Full-size layouts without allocating weights: only module names and shapes matter here.
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def fake_components(hidden_act: str, cross_attention_dim: int, **unet_config) -> dict:
    unet = SimpleNamespace(config={"cross_attention_dim": cross_attention_dim, **unet_config})
    text_encoder = SimpleNamespace(config=CLIPTextConfig(hidden_act=hidden_act))
    return {"unet": unet, "text_encoder": text_encoder, "tokenizer": object()}


def test_detects_the_family_of_the_tiny_fixtures(tiny_sd1_pipe, tiny_sdxl_pipe):
    assert detect_family(tiny_sd1_pipe) is SD1
    assert detect_family(tiny_sdxl_pipe) is SDXL
    assert detect_family(tiny_sdxl_pipe.components) is SDXL


def test_detects_sd2_only_for_an_openclip_text_encoder_with_1024_wide_cross_attention():
    assert detect_family(fake_components("gelu", 1024)) is SD2
    # SD1 layouts with other widths or CLIP's quick_gelu stay SD1, however odd their sizes.
    assert detect_family(fake_components("gelu", 48)) is SD1
    assert detect_family(fake_components("quick_gelu", 1024)) is SD1
    assert detect_family(fake_components("quick_gelu", 40)) is SD1
    assert detect_family(fake_components("quick_gelu", 40, addition_embed_type="text_time")) is SDXL


def test_detect_family_refuses_something_that_is_not_a_stable_diffusion_pipeline():
    with pytest.raises(InvalidInputError, match="expected a Stable Diffusion pipeline"):
        detect_family({"vae": object()})
    with pytest.raises(InvalidInputError, match="found int"):
        detect_family(3)


def test_family_fields_other_tools_read():
    assert [f.name for f in (SD1, SD2, SDXL)] == ["sd1", "sd2", "sdxl"]
    assert [f.label for f in (SD1, SD2, SDXL)] == ["SD1.x", "SD2.x", "SDXL"]
    assert SD1.embedding_keys == ("emb_params",) and SDXL.embedding_keys == ("clip_l", "clip_g")
    assert SD1.kohya_text_prefixes == ("lora_te",) and SDXL.kohya_text_prefixes == ("lora_te1", "lora_te2")
    assert SDXL.modelspec_architecture == "stable-diffusion-xl-v1-base"
    assert SD1.ss_base_model_version == "sd_v1" and SDXL.ss_base_model_version == "sdxl_base_v1-0"
    assert family_by_name("sd2") is SD2
    with pytest.raises(InvalidInputError, match="found 'sd3'"):
        family_by_name("sd3")


def test_components_and_embedding_widths(tiny_sd1_pipe, tiny_sdxl_pipe):
    assert SD1.text_encoders(tiny_sd1_pipe) == [tiny_sd1_pipe.text_encoder]
    assert SDXL.tokenizers(tiny_sdxl_pipe) == [tiny_sdxl_pipe.tokenizer, tiny_sdxl_pipe.tokenizer_2]
    assert SD1.embedding_widths(tiny_sd1_pipe) == (32,)
    assert SDXL.embedding_widths(tiny_sdxl_pipe) == (32, 32)


def test_cross_attention_layers_are_in_unet_order():
    layers = SD1.cross_attention_layers(meta_unet(sd15_unet_config()))
    assert len(layers) == 16
    assert layers[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
    assert layers[6] == "mid_block.attentions.0.transformer_blocks.0.attn2.processor"
    assert layers[-1] == "up_blocks.3.attentions.2.transformer_blocks.0.attn2.processor"
    assert all(name.endswith("attn2.processor") for name in layers)


def test_cross_attention_layers_of_the_tiny_fixtures(tiny_sd1_pipe, tiny_sdxl_pipe):
    # SD1 tiny: 2 down + 1 mid + 3 up; SDXL tiny: (2 down + 1 mid + 3 up) x 2 transformer layers.
    assert len(SD1.cross_attention_layers(tiny_sd1_pipe.unet)) == 6
    sdxl_layers = SDXL.cross_attention_layers(tiny_sdxl_pipe.unet)
    assert len(sdxl_layers) == 12
    assert sdxl_layers[4].startswith("mid_block.")


@pytest.mark.parametrize(
    ("family", "unet"),
    [
        (SD1, lambda: build_tiny_sd1_pipeline().unet),
        (SD1, lambda: meta_unet(sd15_unet_config())),
        (SDXL, lambda: build_tiny_sdxl_pipeline().unet),
        (SDXL, lambda: meta_unet(SDXL_UNET_CONFIG)),
    ],
    ids=["sd1-tiny", "sd15-full", "sdxl-tiny", "sdxl-full"],
)
def test_kohya_unet_names_round_trip_for_every_layer(family, unet):
    unet = unet()
    paths = [path for path, _ in iter_lora_layers(unet)]
    keys = [family.kohya_unet_key(path) for path in paths]
    assert len(set(keys)) == len(keys)
    assert [family.diffusers_unet_path(key) for key in keys] == paths


def test_kohya_names_match_what_kohya_and_a1111_write():
    assert (
        SD1.kohya_unet_key("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
        == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    )
    sgm = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (
            "input_blocks_4_1_transformer_blocks_0_attn1_to_q"
        ),
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0": (
            "input_blocks_8_1_transformer_blocks_9_attn2_to_out_0"
        ),
        "mid_block.attentions.0.proj_in": "middle_block_1_proj_in",
        "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.0.proj": (
            "output_blocks_2_1_transformer_blocks_0_ff_net_0_proj"
        ),
        "up_blocks.1.resnets.0.conv1": "output_blocks_3_0_in_layers_2",
        "down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
        "up_blocks.0.upsamplers.0.conv": "output_blocks_2_2_conv",
        "time_embedding.linear_1": "time_embed_0",
        "add_embedding.linear_2": "label_emb_0_2",
        "conv_in": "input_blocks_0_0",
    }
    for path, name in sgm.items():
        assert SDXL.kohya_unet_key(path) == "lora_unet_" + name
        assert SDXL.diffusers_unet_path("lora_unet_" + name) == path


@pytest.mark.parametrize("family", [SD1, SDXL], ids=["sd1", "sdxl"])
def test_kohya_text_names_round_trip(family, tiny_sd1_pipe, tiny_sdxl_pipe):
    pipe = tiny_sdxl_pipe if family is SDXL else tiny_sd1_pipe
    for index, encoder in enumerate(family.text_encoders(pipe)):
        for path, module in iter_lora_layers(encoder):
            key = family.kohya_text_key(index, path)
            assert key.startswith(family.kohya_text_prefixes[index] + "_")
            # Whatever transformers nests, files name text modules from the text_model root (or text_projection).
            assert key.startswith(family.kohya_text_prefixes[index] + "_text_") or key.endswith("text_projection")
            back_index, canonical = family.diffusers_text_path(key)
            assert back_index == index
            assert encoder.get_submodule(text_module_path(encoder, canonical)) is module
    assert SD1.kohya_text_key(0, "text_model.encoder.layers.0.self_attn.q_proj") == (
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    )


def test_unknown_kohya_names_are_one_line_errors():
    with pytest.raises(InvalidInputError, match="expected a kohya SDXL U-Net module name"):
        SDXL.diffusers_unet_path("lora_unet_input_blocks_4_7_proj_in")
    with pytest.raises(InvalidInputError, match="found 'lora_te1_text_model"):
        SD1.diffusers_text_path("lora_te1_text_model_encoder_layers_0_self_attn_q_proj")
    with pytest.raises(InvalidInputError):
        SD1.diffusers_unet_path("lora_te_text_model_encoder_layers_0_self_attn_q_proj")


def _kohya_lora(family, pipe, rank: int = 2) -> tuple[dict, dict]:
    """A kohya-format LoRA on every U-Net layer and every text attention projection, with distinct weights."""
    state_dict: dict[str, torch.Tensor] = {}
    downs: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(0)
    modules = [("unet", family.kohya_unet_key, path, m) for path, m in iter_lora_layers(pipe.unet)]
    for index, attr in enumerate(family.text_encoder_attrs):
        for path, m in iter_lora_layers(getattr(pipe, attr)):
            if path.endswith(family.text_lora_targets):
                modules.append((attr, lambda p, i=index: family.kohya_text_key(i, p), path, m))
    for attr, to_key, path, module in modules:
        weight = module.weight
        kernel = tuple(weight.shape[2:])
        down = torch.randn(rank, weight.shape[1], *kernel, generator=generator)
        up = torch.randn(weight.shape[0], rank, *(1 for _ in kernel), generator=generator)
        key = to_key(path)
        state_dict |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
        downs[f"{attr}.{path}"] = down
    return state_dict, downs


@pytest.mark.parametrize(
    ("family", "build"), [(SD1, build_tiny_sd1_pipeline), (SDXL, build_tiny_sdxl_pipeline)], ids=["sd1", "sdxl"]
)
def test_diffusers_kohya_loader_puts_our_keys_on_exactly_the_intended_layers(family, build):
    # An SGM numbering mistake would make diffusers drop keys, raise, or put weights on the wrong (same-shaped) layer.
    pipe = build()
    state_dict, downs = _kohya_lora(family, pipe)
    pipe.load_lora_weights(state_dict, adapter_name="probe")
    loaded: dict[str, torch.Tensor] = {}
    for attr in ("unet", *family.text_encoder_attrs):
        for path, module in getattr(pipe, attr).named_modules():
            if hasattr(module, "lora_A") and "probe" in module.lora_A:
                loaded[f"{attr}.{path}"] = module.lora_A["probe"].weight.detach()
    assert sorted(loaded) == sorted(downs)
    for name, down in downs.items():
        assert torch.equal(loaded[name], down), name
