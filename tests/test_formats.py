"""Foreign formats: files other tools made import correctly, and exported files load in diffusers as they should."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.adapter_files import AdapterFile, AdapterMetadata, read_header
from studio.base_models import BaseModel
from studio.errors import AlreadyExistsError, CorruptFileError, InvalidInputError, StudioError, UnsafeFileError
from studio.families import SD1, SDXL, ModelFamily, detect_family, iter_lora_layers
from studio.formats import export_adapter, import_adapter
from studio.testing import build_tiny_sd1_pipeline, build_tiny_sdxl_pipeline


def make_lora(pipe, family: ModelFamily, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> AdapterFile:
    """A LoRA in the studio layout with non-zero up weights, so that it changes the image."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def add(key: str, layer: torch.nn.Linear) -> None:
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=generator) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, rank, generator=generator) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(alpha)

    for path, layer in iter_lora_layers(pipe.unet):
        if path.endswith(family.unet_lora_targets):
            add(family.kohya_unet_key(path), layer)
    for index, encoder in enumerate(family.text_encoders(pipe)):
        for path, layer in iter_lora_layers(encoder):
            if path.endswith(family.text_lora_targets):
                add(family.kohya_text_key(index, path), layer)
    meta = AdapterMetadata(kind="lora", family=family.name, base_model="tiny", placeholder_tokens=["sks"], name="dog")
    return AdapterFile(tensors, meta)


def render(pipe, prompt: str = "a photo of sks dog", **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, generator=generator, output_type="np", **kwargs).images[0]


# --- import: LoRA -------------------------------------------------------------------------------------------------


def test_kohya_lora_import_keeps_card_and_writes_alpha(tmp_path: Path) -> None:
    path = tmp_path / "kohya.safetensors"
    save_file(
        {
            "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(4, 768),
            "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(320, 4),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 768),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(768, 4),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0, dtype=torch.float16),
        },
        path,
        metadata={"ss_base_model_version": "sd_v1", "ss_network_dim": "4", "modelspec.trigger_phrase": "sks, dog"},
    )
    adapter = import_adapter(path)
    assert adapter.metadata.kind == "lora"
    assert adapter.metadata.family == "sd1"
    assert adapter.metadata.placeholder_tokens == ["sks", "dog"]
    assert adapter.metadata.extra["ss_network_dim"] == "4"
    # The missing alpha is written out as rank (kohya's and diffusers' reading), the existing one kept.
    assert float(adapter.tensors["lora_unet_mid_block_attentions_0_proj_in.alpha"]) == 4.0
    assert float(adapter.tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"]) == 1.0


def test_sdxl_family_is_read_from_kohya_keys(tmp_path: Path) -> None:
    path = tmp_path / "xl.safetensors"
    save_file(
        {
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 32),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(32, 2),
        },
        path,
    )
    assert import_adapter(path).metadata.family == "sdxl"


def test_diffusers_lora_written_by_diffusers_imports_to_the_same_weights(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    pipe = build_tiny_sd1_pipeline(seed=0)
    adapter = make_lora(pipe, SD1, rank=4, alpha=4.0)  # alpha == rank: diffusers' own files are the same numbers
    pipe.load_lora_weights(adapter.tensors, adapter_name="dog")
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="dog"),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="dog"),
    )
    written = tmp_path / "pytorch_lora_weights.safetensors"
    assert any(key.endswith(".lora_A.weight") for key in load_file(written))

    imported = import_adapter(written, base=BaseModel.from_pipeline(pipe, "tiny"))
    assert imported.metadata.family == "sd1"
    assert imported.tensors.keys() == adapter.tensors.keys()
    for key, tensor in adapter.tensors.items():
        torch.testing.assert_close(imported.tensors[key], tensor)


def test_diffusers_lora_round_trip_keeps_the_effective_weights(tmp_path: Path) -> None:
    pipe = build_tiny_sd1_pipeline(seed=0)
    adapter = make_lora(pipe, SD1, rank=4, alpha=1.0)
    (out,) = export_adapter(adapter, "diffusers", tmp_path / "peft.safetensors", SD1)
    assert read_header(out)["format"] == "pt"
    back = import_adapter(out, base=None)
    for key in adapter.tensors:
        if key.endswith(".lora_up.weight"):
            module = key.removesuffix(".lora_up.weight")
            scale = float(adapter.tensors[f"{module}.alpha"]) / 4
            back_scale = float(back.tensors[f"{module}.alpha"]) / 4
            torch.testing.assert_close(back.tensors[key] * back_scale, adapter.tensors[key] * scale)


def test_legacy_attention_processor_lora_imports(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_lora_weights.bin"
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    torch.save(
        {
            f"unet.{attn}.processor.to_q_lora.down.weight": torch.randn(2, 32),
            f"unet.{attn}.processor.to_q_lora.up.weight": torch.randn(32, 2),
            f"unet.{attn}.processor.to_out_lora.down.weight": torch.randn(2, 32),
            f"unet.{attn}.processor.to_out_lora.up.weight": torch.randn(32, 2),
            "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight": torch.randn(2, 32),
            "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.up.weight": torch.randn(32, 2),
            "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.down.weight": torch.randn(2, 32),
            "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.up.weight": torch.randn(37, 2),
        },
        path,
    )
    adapter = _import_with_family(path, SD1)
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"
    assert f"{prefix}_to_q.lora_down.weight" in adapter.tensors
    assert f"{prefix}_to_out_0.lora_up.weight" in adapter.tensors
    assert float(adapter.tensors[f"{prefix}_to_q.alpha"]) == 2.0
    assert "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight" in adapter.tensors
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight" in adapter.tensors


def _import_with_family(path: Path, family: ModelFamily) -> AdapterFile:
    from studio.library import check_compatible

    pipe = build_tiny_sd1_pipeline() if family is SD1 else build_tiny_sdxl_pipeline()
    base = BaseModel.from_pipeline(pipe, "tiny")
    adapter = import_adapter(path, base=base)
    check_compatible(adapter, base)  # the converted names and shapes exist in the base model
    return adapter


@pytest.mark.parametrize(
    ("key", "algorithm"),
    [
        ("lora_unet_x.hada_w1_a", "LoHa"),
        ("lora_unet_x.lokr_w1", "LoKr"),
        ("lora_unet_x.dora_scale", "DoRA"),
        ("lora_unet_x.lora_mid.weight", "Tucker"),
    ],
)
def test_lycoris_is_refused_with_its_name(tmp_path: Path, key: str, algorithm: str) -> None:
    path = tmp_path / "lyco.safetensors"
    save_file({key: torch.randn(2, 2), "lora_unet_x.alpha": torch.tensor(1.0)}, path)
    with pytest.raises(InvalidInputError, match=f"{algorithm}.*not supported"):
        import_adapter(path)


# --- import: embeddings --------------------------------------------------------------------------------------------


def test_a1111_pt_embedding_imports_with_file_name_as_token(tmp_path: Path) -> None:
    path = tmp_path / "my-style.pt"
    vectors = torch.randn(3, 768)
    torch.save(
        {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "whatever", "step": 500}, path
    )
    adapter = import_adapter(path)
    assert adapter.metadata.kind == "textual_inversion"
    assert adapter.metadata.family == "sd1"
    assert adapter.metadata.placeholder_tokens == ["my-style"]
    assert torch.equal(adapter.tensors["emb_params"], vectors)


def test_single_key_safetensors_embeddings(tmp_path: Path) -> None:
    a1111 = tmp_path / "wide style.safetensors"
    save_file({"emb_params": torch.randn(2, 1024)}, a1111)
    adapter = import_adapter(a1111)
    assert (adapter.metadata.family, adapter.metadata.placeholder_tokens) == ("sd2", ["wide_style"])

    diffusers = tmp_path / "learned_embeds.safetensors"
    save_file({"<cat-toy>": torch.randn(1, 768)}, diffusers)
    adapter = import_adapter(diffusers)
    assert adapter.metadata.placeholder_tokens == ["<cat-toy>"]
    assert adapter.tensors["emb_params"].shape == (1, 768)


def test_diffusers_bin_embedding_with_one_vector(tmp_path: Path) -> None:
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<tiny>": torch.randn(32)}, path)
    adapter = _import_with_family(path, SD1)  # 32 wide: only the tiny base model tells the family
    assert adapter.metadata.family == "sd1"
    assert adapter.tensors["emb_params"].shape == (1, 32)


def test_sdxl_embedding_imports(tmp_path: Path) -> None:
    path = tmp_path / "xl-style.safetensors"
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, path)
    adapter = import_adapter(path)
    assert adapter.metadata.family == "sdxl"
    assert adapter.tensors["clip_g"].shape == (2, 1280)


# --- not adapters -------------------------------------------------------------------------------------------------


def test_files_that_are_not_adapters(tmp_path: Path) -> None:
    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    text = tmp_path / "readme.safetensors"
    text.write_text("just some text")
    unrelated = tmp_path / "weights.safetensors"
    save_file({"encoder.weight": torch.randn(3, 3, 3), "encoder.bias": torch.randn(3)}, unrelated)
    checkpoint = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.randn(4, 4)}, checkpoint)
    for path, message in [
        (png, "PNG"),
        (text, "not an adapter"),
        (unrelated, "not an adapter"),
        (checkpoint, "full model checkpoint"),
    ]:
        with pytest.raises(StudioError, match=message) as info:
            import_adapter(path)
        assert "\n" not in str(info.value)


def test_pickle_payload_is_refused_on_import(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple:
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "embedding.pt"
    torch.save({"string_to_param": {"*": Payload()}}, path)
    with pytest.raises(UnsafeFileError):
        import_adapter(path)
    assert not (tmp_path / "pwned").exists()


def test_nan_embedding_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    torch.save({"string_to_param": {"*": torch.full((1, 768), float("nan"))}}, path)
    with pytest.raises(CorruptFileError, match="NaN"):
        import_adapter(path)


# --- export: LoRA -------------------------------------------------------------------------------------------------


def test_kohya_export_loads_in_diffusers_and_diffusers_export_gives_the_same_image(tmp_path: Path) -> None:
    adapter = make_lora(build_tiny_sd1_pipeline(seed=0), SD1, rank=4, alpha=2.0)
    (kohya,) = export_adapter(adapter, "kohya", tmp_path / "dog_kohya.safetensors", SD1)
    (peft,) = export_adapter(adapter, "diffusers", tmp_path / "dog_peft.safetensors", SD1)

    header = read_header(kohya)
    assert header["ss_network_module"] == "networks.lora"
    assert header["ss_network_dim"] == "4"
    assert header["ss_network_alpha"] == "2"
    assert header["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert header["modelspec.trigger_phrase"] == "sks"

    plain = render(build_tiny_sd1_pipeline(seed=0))
    images = []
    for path in (kohya, peft):
        pipe = build_tiny_sd1_pipeline(seed=0)
        pipe.load_lora_weights(str(path))
        images.append(render(pipe))
    assert np.abs(images[0] - plain).max() > 1e-3, "the LoRA should change the image"
    np.testing.assert_allclose(images[0], images[1], atol=1e-5)


def test_sdxl_kohya_export_matches_diffusers_export(tmp_path: Path) -> None:
    adapter = make_lora(build_tiny_sdxl_pipeline(seed=0), SDXL, rank=2, alpha=1.0)
    assert any(key.startswith("lora_unet_input_blocks_") for key in adapter.tensors)  # SGM names, as kohya writes
    (kohya,) = export_adapter(adapter, "kohya", tmp_path / "xl_kohya.safetensors", SDXL)
    (peft,) = export_adapter(adapter, "diffusers", tmp_path / "xl_peft.safetensors", SDXL)
    images = []
    for path in (kohya, peft):
        pipe = build_tiny_sdxl_pipeline(seed=0)
        pipe.load_lora_weights(str(path))
        images.append(render(pipe))
    assert np.abs(images[0] - render(build_tiny_sdxl_pipeline(seed=0))).max() > 1e-3
    np.testing.assert_allclose(images[0], images[1], atol=1e-5)


def test_export_never_overwrites(tmp_path: Path) -> None:
    adapter = make_lora(build_tiny_sd1_pipeline(seed=0), SD1)
    out = tmp_path / "dog.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(AlreadyExistsError):
        export_adapter(adapter, "kohya", out, SD1)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(InvalidInputError, match="format"):
        export_adapter(adapter, "ckpt", tmp_path / "x.safetensors", SD1)


# --- export: embeddings -------------------------------------------------------------------------------------------


def _embedding(family: ModelFamily, pipe, token: str = "<cat-toy>", vectors: int = 2) -> AdapterFile:
    generator = torch.Generator().manual_seed(1)
    tensors = {
        key: torch.randn(vectors, width, generator=generator)
        for key, width in zip(family.embedding_keys, family.embedding_widths(pipe), strict=True)
    }
    meta = AdapterMetadata(kind="textual_inversion", family=family.name, placeholder_tokens=[token], name="cat")
    return AdapterFile(tensors, meta)


def _prompt_embeds_by_hand(pipe, prompt: str, stand_ins: list[str], vectors: torch.Tensor) -> torch.Tensor:
    """Encode ``prompt`` with the stand-in words' embedding rows temporarily replaced by ``vectors``."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    ids = [tokenizer.convert_tokens_to_ids(word + "</w>") for word in stand_ins]
    table = encoder.get_input_embeddings().weight
    saved = table.data[ids].clone()
    try:
        table.data[ids] = vectors
        tokens = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        with torch.no_grad():
            return encoder(tokens.input_ids)[0]
    finally:
        table.data[ids] = saved


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a1111_embedding_export_loads_with_load_textual_inversion(tmp_path: Path, suffix: str) -> None:
    pipe = build_tiny_sd1_pipeline(seed=0)
    adapter = _embedding(SD1, pipe)
    (path,) = export_adapter(adapter, "a1111", tmp_path / f"cat{suffix}", SD1)
    if suffix == ".pt":
        assert torch.load(path, weights_only=True)["name"] == "<cat-toy>"
    else:
        assert load_file(path).keys() == {"emb_params"}

    pipe.load_textual_inversion(str(path), token="<cat-toy>")
    with_token = render(pipe, "a photo of <cat-toy> on a table")

    manual = build_tiny_sd1_pipeline(seed=0)
    vectors = adapter.tensors["emb_params"]
    embeds = _prompt_embeds_by_hand(manual, "a photo of cat dog on a table", ["cat", "dog"], vectors)
    negative = _prompt_embeds_by_hand(manual, "", [], vectors[:0])
    by_hand = render(manual, None, prompt_embeds=embeds, negative_prompt_embeds=negative)
    np.testing.assert_allclose(with_token, by_hand, atol=1e-5)
    assert np.abs(with_token - render(manual, "a photo of cat dog on a table")).max() > 1e-3


def test_diffusers_embedding_export_sd1(tmp_path: Path) -> None:
    pipe = build_tiny_sd1_pipeline(seed=0)
    adapter = _embedding(SD1, pipe, vectors=1)
    (path,) = export_adapter(adapter, "diffusers", tmp_path / "learned_embeds.safetensors", SD1)
    assert list(load_file(path)) == ["<cat-toy>"]
    pipe.load_textual_inversion(str(path))  # the token comes from the file
    token_id = pipe.tokenizer.convert_tokens_to_ids("<cat-toy>")
    torch.testing.assert_close(
        pipe.text_encoder.get_input_embeddings().weight[token_id], adapter.tensors["emb_params"][0]
    )


def test_sdxl_embedding_export_loads_by_two_calls(tmp_path: Path) -> None:
    pipe = build_tiny_sdxl_pipeline(seed=0)
    adapter = _embedding(SDXL, pipe)
    (a1111,) = export_adapter(adapter, "a1111", tmp_path / "xl.safetensors", SDXL)
    state = load_file(a1111)
    assert state.keys() == {"clip_l", "clip_g"}
    pipe.load_textual_inversion(
        state["clip_l"], token="<cat-toy>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state["clip_g"], token="<cat-toy>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    for tokenizer, encoder, key in (
        (pipe.tokenizer, pipe.text_encoder, "clip_l"),
        (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g"),
    ):
        ids = tokenizer.convert_tokens_to_ids(["<cat-toy>", "<cat-toy>_1"])
        torch.testing.assert_close(encoder.get_input_embeddings().weight[ids], adapter.tensors[key])
    assert render(pipe, "a photo of <cat-toy>").shape == (64, 64, 3)

    # The diffusers export writes one file per text encoder, each loadable by path.
    paths = export_adapter(adapter, "diffusers", tmp_path / "xl_diffusers.safetensors", SDXL)
    assert [p.name for p in paths] == [
        "xl_diffusers_text_encoder.safetensors",
        "xl_diffusers_text_encoder_2.safetensors",
    ]
    fresh = build_tiny_sdxl_pipeline(seed=0)
    fresh.load_textual_inversion(str(paths[0]))
    fresh.load_textual_inversion(str(paths[1]), text_encoder=fresh.text_encoder_2, tokenizer=fresh.tokenizer_2)
    ids = fresh.tokenizer_2.convert_tokens_to_ids(["<cat-toy>", "<cat-toy>_1"])
    torch.testing.assert_close(fresh.text_encoder_2.get_input_embeddings().weight[ids], adapter.tensors["clip_g"])


def test_sdxl_embedding_has_no_pt_export(tmp_path: Path) -> None:
    adapter = _embedding(SDXL, build_tiny_sdxl_pipeline(seed=0))
    with pytest.raises(InvalidInputError, match=r"\.safetensors"):
        export_adapter(adapter, "a1111", tmp_path / "xl.pt", SDXL)
    assert not (tmp_path / "xl.pt").exists()


def test_studio_file_imports_as_is(tmp_path: Path) -> None:
    from studio.adapter_files import save_adapter

    adapter = make_lora(build_tiny_sd1_pipeline(seed=0), SD1)
    path = save_adapter(tmp_path / "dog.safetensors", adapter)
    back = import_adapter(path)
    assert back.metadata == adapter.metadata
    assert json.loads(read_header(path)["studio.placeholder_tokens"]) == ["sks"]
    assert detect_family(build_tiny_sd1_pipeline()) is SD1
