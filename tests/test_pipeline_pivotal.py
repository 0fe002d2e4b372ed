"""A pivotal-tuning LoRA (LoRA + its placeholder's embedding in one file) works in the shared pipeline and exports
as a LoRA plus an embedding for diffusers."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from safetensors.torch import load_file
from test_pipeline_helpers import pixels, random_embedding, random_lora, tiny_base, write

from pipelines.requests import AdapterRef, GenerationRequest
from pipelines.service import PipelineService
from studio.adapter_files import AdapterFile
from studio.families import SD1
from studio.formats import bundle_embedding_keys, export_adapter

PROMPT = "a photo of <pivot>"


def pivotal_adapter(pipe) -> AdapterFile:
    lora = random_lora(pipe, seed=3)
    embedding = random_embedding(seed=4, vectors=2, placeholder="<pivot>")
    (key,) = bundle_embedding_keys(SD1, "<pivot>")
    tensors = {**lora.tensors, key: embedding.tensors["emb_params"]}
    meta = dataclasses.replace(lora.metadata, placeholder_tokens=["<pivot>"], name="pivot")
    return AdapterFile(tensors, meta)


def generate(service: PipelineService, *adapters: str, prompt: str = PROMPT) -> np.ndarray:
    request = GenerationRequest(prompt=prompt, seeds=[1], steps=3, width=32, height=32)
    request = dataclasses.replace(request, adapters=[AdapterRef.parse(a) for a in adapters])
    return pixels(service.generate(request).images[0])


def test_pivotal_bundle_uses_both_the_lora_and_its_token(tmp_path):
    base = tiny_base()
    bundle = pivotal_adapter(base.pipeline)
    lora_only = AdapterFile(
        {k: v for k, v in bundle.tensors.items() if not k.startswith("bundle_emb.")}, bundle.metadata
    )
    write(tmp_path, "pivot", bundle)
    write(
        tmp_path,
        "lora-only",
        dataclasses.replace(lora_only, metadata=dataclasses.replace(bundle.metadata, placeholder_tokens=[])),
    )
    service = PipelineService(base, adapter_source=tmp_path)
    with_bundle = generate(service, "pivot")
    without_token = generate(service, "lora-only")
    plain = generate(service)
    # The token carries the trained embedding (not the literal text "<pivot>"), and the LoRA is active too.
    assert not np.array_equal(with_bundle, without_token)
    assert not np.array_equal(without_token, plain)
    # And nothing stays behind for the next request.
    assert np.array_equal(generate(service), plain)


def test_pivotal_bundle_exports_for_diffusers_as_lora_plus_embedding(tmp_path):
    bundle = pivotal_adapter(tiny_base().pipeline)
    written = export_adapter(bundle, "diffusers", tmp_path / "pivot.safetensors")
    assert [p.name for p in written] == ["pivot.safetensors", "pivot.embedding.safetensors"]
    peft = load_file(str(written[0]))
    assert all(not k.startswith("bundle_emb.") for k in peft)
    embedding = load_file(str(written[1]))
    assert list(embedding) == ["<pivot>"] and embedding["<pivot>"].shape == (2, 32)
    assert torch.equal(embedding["<pivot>"], bundle.tensors["bundle_emb.<pivot>.string_to_param.*"])
