"""Trained embeddings work outside the studio exactly as inside: diffusers' own loaders reproduce the studio's image,
and several concepts compose with a LoRA in one prompt through the shared pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.requests import AdapterRef, GenerationRequest
from pipelines.service import PipelineService
from studio.adapter_files import AdapterFile, AdapterMetadata
from studio.base_models import BaseModel
from studio.home import StudioHome
from studio.library import AdapterLibrary
from studio.testing import build_tiny_sd1_pipeline, build_tiny_sdxl_pipeline
from studio.world.concepts import SHIPPED_CONCEPTS, write_reference_folder
from trainers.core.lora import inject_lora, kohya_state_dict, lora_layers
from trainers.textual_inversion import TextualInversionConfig, train_textual_inversion

PROMPT = "a {} on a red background"
STEPS = 2
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """One library with two SD1 embeddings (2 vectors and 1) and one SDXL embedding, each trained for 2 steps."""
    root = tmp_path_factory.mktemp("ti")
    images = root / "images"
    write_reference_folder(SHIPPED_CONCEPTS["robot-toy"], images, count=2)
    library = AdapterLibrary(StudioHome(root / "home"))
    runs = [
        ("toy-a", "<toy-a>", 2, build_tiny_sd1_pipeline),
        ("toy-b", "<toy-b>", 1, build_tiny_sd1_pipeline),
        ("toy-xl", "<toy-xl>", 1, build_tiny_sdxl_pipeline),
    ]
    for name, token, vectors, builder in runs:
        config = TextualInversionConfig(
            placeholder_token=token, init_word="toy", num_vectors=vectors, steps=2, batch_size=1, lr=0.05
        )
        base = BaseModel.from_pipeline(builder(), "tiny-random")
        train_textual_inversion(config, images, base, name=name, library=library, run_dir=root / name)
    return library


def _service_image(library, builder, prompt, adapters) -> np.ndarray:
    service = PipelineService(BaseModel.from_pipeline(builder(), "tiny-random"), adapter_source=library)
    request = GenerationRequest(prompt=prompt, seeds=[7], steps=STEPS, guidance=GUIDANCE, adapters=adapters)
    result = service.generate(request)
    assert result.warnings == []
    return np.asarray(result.images[0], dtype=np.int16)


def _diffusers_image(pipe, prompt) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(7)
    image = pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generator).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize(
    ("fmt", "suffix"), [("a1111", ".safetensors"), ("a1111", ".pt"), ("diffusers", ".safetensors")]
)
def test_exported_sd1_embedding_reproduces_the_studio_image_in_diffusers(library, tmp_path, fmt, suffix):
    [path] = library.export("toy-a", fmt, tmp_path / f"toy-a{suffix}")
    pipe = build_tiny_sd1_pipeline()
    # A1111 files name no token (A1111 uses the file name): diffusers needs token=; diffusers files carry it.
    pipe.load_textual_inversion(str(path), token="<toy-a>" if fmt == "a1111" else None)
    ours = _service_image(library, build_tiny_sd1_pipeline, PROMPT.format("<toy-a>"), [AdapterRef("toy-a")])
    theirs = _diffusers_image(pipe, PROMPT.format("<toy-a>"))
    assert np.abs(ours - theirs).max() <= 1
    # ...and the embedding matters: the class word gives another image.
    assert np.abs(ours - _diffusers_image(pipe, PROMPT.format("toy"))).max() > 1


def test_exported_sdxl_embedding_loads_by_the_two_call_route(library, tmp_path):
    [path] = library.export("toy-xl", "a1111", tmp_path / "toy-xl.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(path)
    assert sorted(tensors) == ["clip_g", "clip_l"]
    pipe = build_tiny_sdxl_pipeline()
    pipe.load_textual_inversion(
        tensors["clip_l"], token="<toy-xl>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        tensors["clip_g"], token="<toy-xl>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    ours = _service_image(library, build_tiny_sdxl_pipeline, PROMPT.format("<toy-xl>"), [AdapterRef("toy-xl")])
    theirs = _diffusers_image(pipe, PROMPT.format("<toy-xl>"))
    assert np.abs(ours - theirs).max() <= 1


def test_two_concepts_and_a_lora_in_one_prompt(library):
    # A LoRA with an effect (lora_B non-zero), in the studio's kohya layout.
    unet = build_tiny_sd1_pipeline().unet
    inject_lora(unet, rank=2, alpha=2.0, targets=["to_k", "to_v"], seed=0)
    for _, layer in lora_layers(unet):
        torch.nn.init.normal_(next(iter(layer.lora_B.values())).weight, std=0.5)
    from studio.families import SD1

    library.add(AdapterFile(kohya_state_dict(SD1, unet), AdapterMetadata(kind="lora", family="sd1")), "style-lora")

    service = PipelineService(BaseModel.from_pipeline(build_tiny_sd1_pipeline(), "tiny-random"), adapter_source=library)
    prompt = "a <toy-a> next to a <toy-b> on a red background"
    refs = [AdapterRef("toy-a"), AdapterRef("toy-b"), AdapterRef("style-lora")]
    result = service.generate(GenerationRequest(prompt=prompt, seeds=[3], steps=STEPS, adapters=refs))
    assert result.warnings == []  # both placeholders were found in the prompt
    without_lora = service.generate(GenerationRequest(prompt=prompt, seeds=[3], steps=STEPS, adapters=refs[:2]))
    assert np.abs(np.asarray(result.images[0], float) - np.asarray(without_lora.images[0], float)).max() > 1

    # Each concept sits in its own rows under its own tokens, exactly as trained.
    table = service.pipeline.text_encoder.get_input_embeddings().weight.detach()
    tokenizer = service.pipeline.tokenizer
    for name in ("toy-a", "toy-b"):
        vectors = library.load(name).tensors["emb_params"]
        tokens = service._embeddings.tokens_of(name)
        assert len(tokens) == vectors.shape[0]
        assert torch.equal(table[tokenizer.convert_tokens_to_ids(list(tokens))], vectors)
