"""Base models: loading every kind of spec, the fingerprint, the shape table, and one-line errors."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

import studio.base_models as base_models
from studio.base_models import BaseModel, load_base_model
from studio.errors import InvalidInputError, NotFoundError, StudioError, UnsafeFileError
from studio.families import SD1, SDXL
from studio.testing import build_tiny_sd1_pipeline


@pytest.fixture(scope="module")
def saved_sd1(tmp_path_factory, tiny_sd1_pipe):
    folder = tmp_path_factory.mktemp("models") / "tiny-sd1"
    tiny_sd1_pipe.save_pretrained(folder)
    return folder


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text
    return text


def test_loads_a_diffusers_folder(saved_sd1, tmp_path):
    base_model = load_base_model(str(saved_sd1), cache_dir=tmp_path)
    assert base_model.name == "tiny-sd1"
    assert base_model.family is SD1
    assert type(base_model.pipeline).__name__ == "StableDiffusionPipeline"
    assert base_model.embedding_widths == (32,)
    assert base_model.pipeline.device.type == "cpu"


def test_loading_with_a_dtype_gives_that_dtype(saved_sd1, tmp_path):
    base_model = load_base_model(str(saved_sd1), torch_dtype=torch.bfloat16, cache_dir=tmp_path)
    assert base_model.pipeline.unet.dtype == torch.bfloat16


def test_fingerprint_of_a_folder_is_stable_cached_and_independent_of_dtype(saved_sd1, tmp_path, monkeypatch):
    first = load_base_model(str(saved_sd1), cache_dir=tmp_path).fingerprint
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    cache = json.loads((tmp_path / base_models.FINGERPRINT_CACHE_FILE).read_text())
    assert cache[str(saved_sd1.resolve())]["fingerprint"] == first
    # A new process (empty memo) reads the disk cache instead of hashing again.
    monkeypatch.setattr(base_models, "_FINGERPRINTS", {})
    monkeypatch.setattr(base_models.hashlib, "sha256", None)
    again = load_base_model(str(saved_sd1), torch_dtype=torch.bfloat16, cache_dir=tmp_path)
    assert again.fingerprint == first


def test_fingerprint_changes_with_the_weights(saved_sd1, tmp_path):
    other = tmp_path / "other-sd1"
    build_tiny_sd1_pipeline(seed=1).save_pretrained(other)
    assert load_base_model(str(other), cache_dir=tmp_path).fingerprint != (
        load_base_model(str(saved_sd1), cache_dir=tmp_path).fingerprint
    )


def test_fingerprint_of_an_in_memory_pipeline():
    pipe = build_tiny_sd1_pipeline(seed=0)
    fingerprint = BaseModel.from_pipeline(pipe, "a").fingerprint
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint)
    assert BaseModel.from_pipeline(build_tiny_sd1_pipeline(seed=0), "b").fingerprint == fingerprint
    assert BaseModel.from_pipeline(build_tiny_sd1_pipeline(seed=1), "c").fingerprint != fingerprint
    # A LoRA loaded into the pipeline is not part of the base model.
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    pipe.load_lora_weights(
        {f"{key}.lora_down.weight": torch.ones(2, 32), f"{key}.lora_up.weight": torch.ones(32, 2)}, adapter_name="x"
    )
    assert BaseModel.from_pipeline(pipe, "a").fingerprint == fingerprint


def test_shape_table_names_every_layer_with_kohya_keys(tiny_sd1_pipe, tiny_sdxl_pipe):
    table = BaseModel.from_pipeline(tiny_sd1_pipe, "sd1").shape_table()
    assert table["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == (32, 32)
    assert table["lora_unet_conv_in"] == (32, 4, 3, 3)
    assert table["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == (32, 32)
    assert table["lora_te_text_model_encoder_layers_1_mlp_fc1"] == (37, 32)
    unet_layers = sum(isinstance(m, torch.nn.Linear | torch.nn.Conv2d) for m in tiny_sd1_pipe.unet.modules())
    text_layers = sum(isinstance(m, torch.nn.Linear) for m in tiny_sd1_pipe.text_encoder.modules())
    assert len(table) == unet_layers + text_layers

    sdxl = BaseModel.from_pipeline(tiny_sdxl_pipe, "sdxl")
    assert sdxl.family is SDXL
    sdxl_table = sdxl.shape_table()
    assert sdxl_table["lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"] == (64, 64)
    assert sdxl_table["lora_te2_text_projection"] == (32, 32)
    assert any(key.startswith("lora_te1_") for key in sdxl_table)


def test_missing_path_is_a_one_line_not_found_error():
    with pytest.raises(NotFoundError) as caught:
        load_base_model("/no/such/model")
    assert "no base model at '/no/such/model'" in one_line(caught.value)


def test_hub_id_while_offline_names_the_id():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(StudioError) as caught:
        load_base_model("someone/some-model")
    assert "'someone/some-model'" in one_line(caught.value)
    assert "offline" in str(caught.value)


def test_embedded_tiny_model_missing_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setattr(base_models, "tiny_model_path", lambda: tmp_path / "tiny")
    with pytest.raises(NotFoundError, match=r"not built yet.*python -m studio.world.train_tiny"):
        load_base_model("tiny")


def test_files_that_are_not_base_models_are_refused(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(InvalidInputError, match=r"expected a base model checkpoint \(.safetensors or .ckpt\)"):
        load_base_model(str(text))

    folder = tmp_path / "just-a-folder"
    folder.mkdir()
    with pytest.raises(InvalidInputError, match="model_index.json"):
        load_base_model(str(folder))

    lora = tmp_path / "my_lora.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)}, str(lora))
    with pytest.raises(InvalidInputError) as caught:
        load_base_model(str(lora))
    assert "studio adapters import" in one_line(caught.value)

    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InvalidInputError, match="not a readable safetensors file"):
        load_base_model(str(garbage))


def test_single_file_checkpoint_while_offline_is_a_clear_error(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, str(checkpoint))
    with pytest.raises(NotFoundError) as caught:
        load_base_model(str(checkpoint))
    assert "model.safetensors" in one_line(caught.value) and "offline" in str(caught.value)


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_ckpt_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": _RunsCode(str(marker))}}, checkpoint)
    with pytest.raises(UnsafeFileError) as caught:
        load_base_model(str(checkpoint))
    assert "evil.ckpt" in one_line(caught.value)
    assert not marker.exists()


@pytest.mark.skipif(
    not (base_models.tiny_model_path() / "model_index.json").is_file(), reason="embedded tiny model not built yet"
)
def test_the_embedded_tiny_model_loads(tmp_path):
    base_model = load_base_model("tiny", cache_dir=tmp_path)
    assert base_model.name == "tiny"
    assert base_model.family is SD1
    assert len(base_model.fingerprint) == 16
