"""Tiny random Stable Diffusion pipelines built in code, for tests and benchmarks.

Nothing here downloads anything: every component is built from a config with random weights (deterministic for a
seed), and the tokenizers are read from the offline CLIP BPE files in ``studio/assets/clip_tokenizer``. The module
layout mirrors the real models so LoRA names line up: U-Net attention projections are ``to_q``/``to_k``/``to_v``/
``to_out.0`` and CLIP text attention projections are ``q_proj``/``k_proj``/``v_proj``/``out_proj``.

Sizes follow diffusers' own test suite: a 2-block U-Net (32, 64 channels, ``sample_size`` 32) and a 2-block VAE
(scale factor 2), so the pipelines generate 64x64 images in a fraction of a second on a CPU.

>>> pipe = build_tiny_sd1_pipeline(seed=0)
>>> image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
>>> image.shape
(64, 64, 3)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ASSETS = Path(__file__).resolve().parent / "assets"
CLIP_TOKENIZER_DIR = ASSETS / "clip_tokenizer"
TINY_MODEL_DIR = ASSETS / "tiny"

# The real CLIP vocabulary; the embedding table must match the offline tokenizer.
CLIP_VOCAB_SIZE = 49408
CLIP_BOS_TOKEN_ID = 49406
CLIP_EOS_TOKEN_ID = 49407


def tiny_model_path() -> Path:
    """Where the embedded tiny base model lives (a diffusers folder; it may not be built yet)."""
    return TINY_MODEL_DIR


def load_clip_tokenizer() -> CLIPTokenizer:
    """The CLIP BPE tokenizer (49,408 tokens) from the offline files shipped with the package."""
    return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))


def sd15_unet_config() -> dict[str, Any]:
    """The Stable Diffusion 1.5 U-Net config, written out, to build a full-size random U-Net (benchmarks).

    >>> unet = UNet2DConditionModel(**sd15_unet_config())  # doctest: +SKIP
    """
    return {
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    }


def _scheduler() -> DDIMScheduler:
    # The Stable Diffusion training schedule, so noise levels mean the same as on real models.
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=64,
    )


def tiny_text_config(hidden_size: int, hidden_act: str, projection_dim: int | None = None) -> CLIPTextConfig:
    """The small random CLIP text-encoder config of the tiny test pipelines (``hidden_size`` wide, 2 layers)."""
    kwargs: dict[str, Any] = {}
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        bos_token_id=CLIP_BOS_TOKEN_ID,
        eos_token_id=CLIP_EOS_TOKEN_ID,
        pad_token_id=CLIP_EOS_TOKEN_ID,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        layer_norm_eps=1e-05,
        hidden_act=hidden_act,
        **kwargs,
    )


def build_tiny_sd1_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A random SD1.x-layout pipeline (64x64 images): attention in the first down block and last up block, like SD1.5.

    The same seed gives the same weights; the global torch RNG is left untouched.

    >>> pipe = build_tiny_sd1_pipeline(seed=1)
    >>> pipe.unet.config.cross_attention_dim
    32
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        )
        vae = _vae()
        text_encoder = CLIPTextModel(tiny_text_config(32, "quick_gelu"))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A random SDXL-layout pipeline (64x64 images): two text encoders, ``text_time`` added conditioning.

    Like SDXL the first down block has no attention and the second has 2 transformer layers per attention.

    >>> pipe = build_tiny_sdxl_pipeline()
    >>> pipe.unet.config.addition_embed_type
    'text_time'
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            # 6 micro-conditioning numbers x addition_time_embed_dim + the pooled width of text_encoder_2.
            projection_class_embeddings_input_dim=6 * 8 + 32,
            # The two text encoders' hidden states are concatenated: 32 + 32.
            cross_attention_dim=64,
            norm_num_groups=1,
        )
        vae = _vae()
        text_encoder = CLIPTextModel(tiny_text_config(32, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(32, "gelu", projection_dim=32))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer(),
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
