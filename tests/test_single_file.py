"""Single-file checkpoints: what `save_single_file` writes, diffusers' own single-file loader reads back exactly.

diffusers' ``from_single_file`` (the LDM/SGM -> diffusers conversion A1111-style files go through) is the independent
reference: every tensor must come back bit-identical and the same seed must give the same image. If these fail, a
user's exported model would load with some weights missing or misplaced, and render differently in other tools.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextModelWithProjection

from studio.base_models import load_base_model
from studio.errors import InvalidInputError
from studio.families import SD2
from studio.single_file import save_single_file
from studio.testing import build_tiny_sdxl_pipeline, tiny_text_config
from studio.testing import tiny_model_path as shipped_tiny_path
from trainers.core.lora import inject_lora

ENCODERS = {StableDiffusionPipeline: ("text_encoder",), StableDiffusionXLPipeline: ("text_encoder", "text_encoder_2")}


def _round_trip(pipe, tmp_path: Path, **kwargs):
    """Save ``pipe`` as one file, load it back with diffusers (offline: configs from a diffusers folder of ``pipe``)."""
    config = tmp_path / "config"
    pipe.save_pretrained(str(config))
    path = save_single_file(pipe, tmp_path / "model.safetensors", {"modelspec.title": "round trip"}, **kwargs)
    loaded = type(pipe).from_single_file(str(path), config=str(config), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    return path, loaded


def _read(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}, handle.metadata()


def _assert_same_model(original, loaded, path: Path) -> None:
    shapes, _ = _read(path)
    written = 0
    for name in ("unet", "vae", *ENCODERS[type(original)]):
        ours, theirs = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(ours) == set(theirs), name
        changed = [key for key in ours if theirs[key].is_meta or not torch.equal(ours[key], theirs[key])]
        assert changed == [], f"{name}: {changed[:5]}"
        written += sum(tensor.numel() for tensor in ours.values())
    # Every weight written once (OpenCLIP fuses q, k, v into one tensor, so count numbers, not tensors).
    assert sum(int(np.prod(shape)) for shape in shapes.values()) == written

    def image(pipe):
        generator = torch.Generator("cpu").manual_seed(3)
        return pipe("a red circle", num_inference_steps=2, generator=generator, output_type="np").images[0]

    assert np.array_equal(image(original), image(loaded))


def test_sd1_round_trip_is_exact_and_uses_ldm_names(tiny_sd1_pipe, tmp_path):
    pipe = copy.deepcopy(tiny_sd1_pipe)
    path, loaded = _round_trip(pipe, tmp_path)
    _assert_same_model(pipe, loaded, path)

    shapes, header = _read(path)
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",  # attention in level 0
        "model.diffusion_model.input_blocks.3.0.op.weight",  # down-sampler after 2 layers
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",  # up-sampler of an up block without attention
        "model.diffusion_model.output_blocks.3.0.skip_connection.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.conv_in.weight",
        "first_stage_model.decoder.up.1.upsample.conv.weight",  # decoder levels count from the bottom
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
    ):
        assert key in shapes, key
    diffusers_names = ("down_blocks", "up_blocks", "mid_block", "resnets", "conv_shortcut", "time_embedding")
    assert not [key for key in shapes if any(name in key for name in diffusers_names)]
    vae_keys = [key for key in shapes if key.startswith("first_stage_model.")]
    assert not [key for key in vae_keys if "to_q" in key or "group_norm" in key]
    # LDM's VAE mid attention is made of 1x1 convolutions.
    assert shapes["first_stage_model.decoder.mid.attn_1.q.weight"] == (64, 64, 1, 1)
    assert shapes["first_stage_model.decoder.mid.attn_1.proj_out.weight"] == (64, 64, 1, 1)
    assert header["modelspec.architecture"] == "stable-diffusion-v1"
    assert header["modelspec.title"] == "round trip"
    assert (header["modelspec.resolution"], header["modelspec.prediction_type"]) == ("64x64", "epsilon")
    assert (header["studio.kind"], header["studio.family"]) == ("checkpoint", "sd1")
    assert list(tmp_path.glob(".*.tmp")) == []


@pytest.mark.skipif(not (shipped_tiny_path() / "model_index.json").is_file(), reason="embedded tiny model not built")
def test_shipped_tiny_model_round_trip_is_exact(tmp_path):
    # Another structure: 3 levels, 1 layer per block, attention in the lower levels, DPM-Solver scheduler.
    pipe = load_base_model("tiny").pipeline
    path, loaded = _round_trip(pipe, tmp_path)
    _assert_same_model(pipe, loaded, path)
    shapes, _ = _read(path)
    # 2 layers per up block; the up-samplers of the two attention levels come after their attention.
    assert "model.diffusion_model.output_blocks.3.2.conv.weight" in shapes
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in shapes  # 1 layer per down block, then down-sampler


def _sdxl_with_distinct_encoder_widths():
    # diffusers tells SDXL's two encoders apart by width (768 vs 1280); the shared tiny pipeline has 32 for both.
    base = build_tiny_sdxl_pipeline()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(48, "gelu", projection_dim=40))
        unet = UNet2DConditionModel.from_config(
            base.unet.config, cross_attention_dim=32 + 48, projection_class_embeddings_input_dim=6 * 8 + 40
        )
    components = {**base.components, "text_encoder_2": text_encoder_2, "unet": unet}
    pipe = StableDiffusionXLPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_round_trip_is_exact_with_sgm_and_open_clip_names(tmp_path):
    pipe = _sdxl_with_distinct_encoder_widths()
    path, loaded = _round_trip(pipe, tmp_path)
    _assert_same_model(pipe, loaded, path)
    shapes, header = _read(path)
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in shapes
    open_clip = "conditioner.embedders.1.model."
    assert shapes[open_clip + "transformer.resblocks.1.attn.in_proj_weight"] == (3 * 48, 48)
    assert shapes[open_clip + "text_projection"] == (48, 40)  # transposed: OpenCLIP computes x @ text_projection
    assert open_clip + "positional_embedding" in shapes
    assert "model.diffusion_model.label_emb.0.0.weight" in shapes
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_sd2_layout_puts_the_text_encoder_in_open_clip_names(tiny_sd1_pipe, tmp_path):
    # SD2's layout differs from SD1's only in the text encoder (OpenCLIP, cond_stage_model.model.*).
    pipe = copy.deepcopy(tiny_sd1_pipe)
    path, loaded = _round_trip(pipe, tmp_path, family=SD2)
    _assert_same_model(pipe, loaded, path)
    shapes, header = _read(path)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias" in shapes
    assert not [key for key in shapes if key.startswith("cond_stage_model.transformer.")]
    assert header["studio.family"] == "sd2"


def test_half_precision_and_refusals(tiny_sd1_pipe, tmp_path):
    pipe = copy.deepcopy(tiny_sd1_pipe)
    path = save_single_file(pipe, tmp_path / "half.safetensors", {"studio.note": {"a": 1}}, dtype=torch.float16)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
        assert json.loads(handle.metadata()["studio.note"]) == {"a": 1}

    # A loaded LoRA would silently be left out of the file: refuse, and leave the existing file alone.
    before = path.read_bytes()
    inject_lora(pipe.unet, rank=2, alpha=2.0, targets=("to_q",), seed=0)
    with pytest.raises(InvalidInputError, match="without adapters loaded"):
        save_single_file(pipe, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.safetensors"]


def test_dreambooth_full_with_single_file_writes_a_loadable_checkpoint(tiny_sd1_pipe, home, tmp_path):
    from studio.base_models import BaseModel
    from studio.library import AdapterLibrary
    from studio.world.concepts import SHIPPED_CONCEPTS, write_reference_folder
    from trainers.core.config import load_config
    from trainers.dreambooth import DreamBoothConfig, train_dreambooth

    images = tmp_path / "images"
    write_reference_folder(SHIPPED_CONCEPTS["robot-toy"], images, count=1)
    overrides = ["mode=full", "single_file=true", "steps=1", "lr=1e-3", "checkpoint_every=0"]
    config = load_config(DreamBoothConfig, values={"class_noun": "toy"}, overrides=overrides)
    base = BaseModel.from_pipeline(copy.deepcopy(tiny_sd1_pipe), "tiny-random")
    result = train_dreambooth(
        config, images, base, name="toy-full", library=AdapterLibrary(home.ensure()), run_dir=home.runs / "toy-full"
    )

    # The folder holds the checkpoint too; both load, and they hold the same fine-tuned weights.
    checkpoint = result.path / "toy-full.safetensors"
    _, header = _read(checkpoint)
    assert header["modelspec.title"] == "toy-full"
    assert header["studio.base_model"] == "tiny-random"
    assert json.loads(header["studio.config"])["single_file"] is True
    folder = load_base_model(str(result.path)).pipeline
    loaded = StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(result.path), local_files_only=True)
    weight = "conv_in.weight"
    assert not torch.equal(folder.unet.state_dict()[weight], tiny_sd1_pipe.unet.state_dict()[weight])
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(folder, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name
